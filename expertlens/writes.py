"""Validation of writes to points: one function keyed by point name.

Every assignment to a point (``model.layers[i].moe.topk_indices = v`` inside a trace) goes
through :func:`check_write` before it reaches the model, and every value an edit function
returns (``model.add_edit``) through :func:`check_edit_output`. A write must have the point's
exact shape, a dtype the point can hold, and (for trace writes) finite values and — for
expert ids — ids in range; otherwise a :class:`~expertlens.PointError` (a ``ValueError``) or a
``TypeError`` names the point, what was given and what is accepted. Nothing is written when the
check fails.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

__all__ = ["PointError", "check_write", "check_edit_output", "INDEX_POINTS", "WRITE_SHAPES"]


class PointError(ValueError):
    """A point that does not exist: layer/expert out of range, MoE point on a dense layer, ...

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("qwen3_moe"), tiny_tokenizer())
        >>> from expertlens import PointError
        >>> try:
        ...     model.layers[99]
        ... except PointError as err:
        ...     print(err)
        layer 99 out of range: the model has 2 layers (0..1)
    """

#: Points holding expert ids (integers in ``0..n_experts-1``); every other point holds floats.
INDEX_POINTS = ("moe.topk_indices",)

#: The shape each point's value has, for messages.
WRITE_SHAPES = {
    "embed": "[batch, pos, d_model]",
    "logits": "[batch, pos, vocab]",
    "resid_pre": "[batch, pos, d_model]",
    "resid_mid": "[batch, pos, d_model]",
    "resid_post": "[batch, pos, d_model]",
    "attn.output": "[batch, pos, d_model]",
    "attn.z": "[batch, pos, heads, d_head]",
    "attn.head_out": "[batch, pos, heads, d_model]",
    "attn_write": "[batch, pos, d_model]",
    "mlp.output": "[batch, pos, d_model]",
    "mlp_write": "[batch, pos, d_model]",
    "moe.router_logits": "[batch, pos, n_experts]",
    "moe.topk_indices": "[batch, pos, top_k]",
    "moe.topk_weights": "[batch, pos, top_k]",
    "moe.expert_out": "[batch, pos, top_k, d_model]",
    "moe.experts[e].output": "[n_routed, d_model]",
    "moe.experts.output": "[n_routed, d_model]",
    "moe.shared_out": "[batch, pos, d_model]",
    "moe.output": "[batch, pos, d_model]",
}


#: Points whose writes must give every axis (no broadcasting).
_EXACT_RANK = ("attn.z", "attn.head_out", "moe.router_logits", "moe.topk_indices", "moe.topk_weights",
               "moe.expert_out")


def _name(point: str, layer: int | None) -> str:
    if layer is None:
        return point
    return f"layers[{layer}].{point}"


def check_write(
    model: Any, point: str, layer: int | None, value: Any, current: Tensor, *, n_experts: int | None = None
) -> Tensor:
    """Validate ``value`` for a write to ``point`` (whose value now is ``current``); return it ready
    to write (on ``current``'s device and dtype).

    Checks, in order: a tensor (``TypeError``); the exact shape of ``current``; a dtype the point
    holds (integers for expert ids, real floating point otherwise; ``TypeError``); finite values
    (also after the cast to the model's dtype; router logits may be ``-inf``, which masks an
    expert, as long as each token keeps a finite one); expert ids in ``0..n_experts-1``.

    Raises:
        PointError: wrong shape, non-finite values or expert ids out of range.
        TypeError: not a tensor, or a dtype the point cannot hold.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> with model.trace("hi"):
        ...     model.layers[1].moe.topk_indices = torch.zeros(1, 2, 2, dtype=torch.long)
        ...     w = model.layers[1].moe.topk_weights.save()
        >>> try:
        ...     with model.trace("hi"):
        ...         model.layers[1].moe.topk_indices = torch.full((1, 2, 2), 8)
        ... except Exception as err:
        ...     print(type(err).__name__, err)
        PointError layers[1].moe.topk_indices: expert ids must be in 0..7 (this layer has 8 routed experts), got [8]
    """
    name = _name(point, layer)
    shape = WRITE_SHAPES.get(re.sub(r"\[\d+\]", "[e]", point), "")
    if not isinstance(value, Tensor):
        kind = type(value).__name__
        raise TypeError(
            f"{name}: a write must be a tensor of shape {tuple(current.shape)} {shape}, got {kind} {value!r:.60}"
        )
    if tuple(value.shape) != tuple(current.shape):
        # A [d]-wide value may broadcast over batch and positions of a residual-width point; points whose
        # middle axes mean something (heads, slots, experts) need every axis, so a [b, p, d] head_out cannot
        # silently broadcast over heads.
        ok = point not in _EXACT_RANK and value.dim() <= current.dim() and value.dim() >= 1
        if ok:
            try:
                ok = torch.broadcast_shapes(value.shape, current.shape) == current.shape
            except RuntimeError:
                ok = False
            ok = ok and value.shape[-1] == current.shape[-1]
        if not ok:
            rule = "every axis, no broadcasting" if point in _EXACT_RANK else "or a shape that broadcasts to it"
            raise PointError(
                f"{name}: the written value has shape {tuple(value.shape)}; expected {tuple(current.shape)} {shape} "
                f"({rule})"
            )
        value = value.expand(current.shape)
    if point in INDEX_POINTS:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name}: expert ids must be an integer tensor (torch.long), got dtype {value.dtype}")
        value = value.to(device=current.device, dtype=current.dtype)
        n = n_experts if n_experts is not None else model.n_experts
        if value.numel() and bool(((value < 0) | (value >= n)).any()):
            bad = value[(value < 0) | (value >= n)].unique()[:5].tolist()
            raise PointError(
                f"{name}: expert ids must be in 0..{n - 1} (this layer has {n} routed experts), got {bad}"
            )
        return value
    if value.is_complex():  # the cast to the point's real dtype would drop the imaginary part
        raise TypeError(f"{name}: the point holds real floating-point values; got complex dtype {value.dtype}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: the point holds floating-point values; got dtype {value.dtype} (cast it first)")
    if value.device.type == "meta":
        raise PointError(f"{name}: the written value is on the meta device (it has no data)")
    cast = value.to(device=current.device, dtype=current.dtype)
    # One check (one host sync): a value that is finite after the cast was finite before it.
    if cast.numel() and not bool(torch.isfinite(cast).all()):
        if point == "moe.router_logits" and _masked_logits_ok(value, cast):
            return cast
        if point == "moe.router_logits":
            raise PointError(
                f"{name}: the written logits contain NaN or +inf, or a token with every logit at -inf; accepted "
                "are finite logits, with -inf for experts a token must never use"
            )
        if not bool(torch.isfinite(value).all()):
            raise PointError(f"{name}: the written value contains NaN or inf; only finite values are accepted")
        raise PointError(
            f"{name}: the written value is finite in {value.dtype} but overflows in the point's {current.dtype}; "
            "rescale it"
        )
    return cast


def _masked_logits_ok(value: Tensor, cast: Tensor) -> bool:
    """Router logits at -inf mask experts (``MaskExperts`` writes them): accepted where no value is NaN or +inf
    (before or after the cast) and every token keeps a finite logit."""
    for v in (value, cast):
        if bool((torch.isnan(v) | (v == float("inf"))).any()) or not bool(torch.isfinite(v).any(-1).all()):
            return False
    return True


def check_edit_output(point: str, layer: int | None, new: Any, old: Tensor) -> Tensor:
    """The value an edit function returned, checked against the value it was given (shape and
    dtype kind only: no device sync, as edits run on every forward).

    Example:
        >>> import torch
        >>> from expertlens.writes import check_edit_output
        >>> check_edit_output("resid_pre", 1, torch.zeros(1, 3, 4), torch.ones(1, 3, 4)).shape
        torch.Size([1, 3, 4])
    """
    name = _name(point, layer)
    if not isinstance(new, Tensor):
        raise TypeError(f"edit at {name} returned {type(new).__name__}; it must return a tensor shaped like its input "
                        f"{tuple(old.shape)} {WRITE_SHAPES.get(point, '')}")
    if new.shape != old.shape:
        raise PointError(
            f"edit at {name} returned shape {tuple(new.shape)}; expected {tuple(old.shape)} "
            f"{WRITE_SHAPES.get(point, '')} (the shape it was given)"
        )
    if point in INDEX_POINTS:
        if new.is_floating_point() or new.dtype == torch.bool:
            raise TypeError(f"edit at {name} returned dtype {new.dtype}; expert ids must be an integer tensor")
    elif not (new.is_floating_point() or new.is_complex()):
        raise TypeError(f"edit at {name} returned dtype {new.dtype}; the point holds floating-point values")
    return new
