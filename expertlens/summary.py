"""Short text for values in reprs: tensors and directions by shape and norm, never their values.

A leaf module (imports only ``direction``): interventions, the activation cache and model reprs share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["summarize"]

_LONG = 60  # characters: a field's repr beyond this is cut (a reader scans the line, not the values)


def summarize(value: Any) -> str:
    """A short text for a field value: tensors and directions by shape and norm, never their values.

    Example:
        >>> import torch
        >>> from expertlens.summary import summarize
        >>> summarize(torch.ones(64))
        'tensor[64] norm=8'
        >>> summarize({1: torch.zeros(8), 2: torch.zeros(8)})
        '{1: tensor[8] norm=0, 2: tensor[8] norm=0}'
    """
    from .direction import Direction

    if isinstance(value, Direction):
        where = f" layer={value.layer}" if getattr(value, "layer", None) is not None else ""
        return f"Direction{list(value.vector.shape)} norm={_norm(value.vector)}{where}"
    if isinstance(value, Tensor):
        shape = list(value.shape)
        if value.dtype == torch.bool:
            return f"mask{shape} ({int(value.sum())} True)"
        if value.is_floating_point() or value.is_complex():
            return f"tensor{shape} norm={_norm(value)}"
        return f"tensor{shape} {str(value.dtype).removeprefix('torch.')}" if value.numel() > 8 else repr(value.tolist())
    if isinstance(value, Mapping) and any(isinstance(v, Tensor) for v in value.values()):
        items = list(value.items())
        parts = [f"{k!r}: {summarize(v)}" for k, v in items[:3]]
        more = f", ... ({len(items)} entries)" if len(items) > 3 else ""
        return "{" + ", ".join(parts) + more + "}"
    text = repr(value)
    return text if len(text) <= _LONG else text[: _LONG - 3] + "..."


def _norm(t: Tensor) -> str:
    if t.is_meta:
        return "?"
    return f"{float(t.detach().double().norm()):.4g}"
