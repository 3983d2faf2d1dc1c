"""Activation patching: cache points from one run, write them into another."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..edits import record
from ..points import MODEL_POINTS
from .activation import point_layers
from .base import Intervention
from .selectors import LayerSpec, Positions, apply_masked, point_shape, token_selection

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["Patch", "cache_points"]


def cache_points(
    model: ExpertModel,
    prompts: str | list[str],
    points: Sequence[str] = ("resid_pre",),
    layers: LayerSpec = None,
    interventions: Sequence[Intervention] = (),
) -> dict[tuple[str, int | None], Tensor]:
    """Run ``prompts`` once (left-padded batch) and return ``{(point, layer): value}`` for patching.

    Values are ``[b, p, ...]`` clones (model-level points have layer ``None``).

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> cache = cache_points(model, ["hello", "hi"], points=["resid_pre", "moe.output"], layers=1)
        >>> sorted(cache)
        [('moe.output', 1), ('resid_pre', 1)]
    """
    points = [points] if isinstance(points, str) else list(points)
    wanted = []
    for point in points:
        lays = point_layers(model, point, None if point in MODEL_POINTS else layers, "cache_points")
        wanted += [(point, lay) for lay in lays]
    with model.intervene(*interventions), record(model, wanted, detach=True) as rec:
        enc = model.tokenize(prompts if isinstance(prompts, list) else [prompts])
        with torch.no_grad():
            model.hf_model(**enc, use_cache=False)
    return dict(rec.values)


@dataclass(frozen=True, eq=False, repr=False)
class Patch(Intervention):
    """Activation patching: ``x ← x_source`` at a point on selected layers / positions / rows.

    ``source`` is a dict from :func:`cache_points` (keys ``(point, layer)``) or, for one layer,
    a ``[b, p, ...]`` tensor. Positions index the source by absolute padded position, so the
    patched run must use prompts tokenized to the same padded length; in generation, positions
    beyond the source are left alone. Shape mismatches are errors naming both shapes.

    Example:
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import Patch, cache_points
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> clean = cache_points(model, ["abcd"], points=["resid_pre"], layers=1)
        >>> with model.intervene(Patch("resid_pre", clean, layers=1)), model.trace("abce"):
        ...     x = model.layers[1].resid_pre.save()
    """

    point: str
    source: dict[tuple[str, int | None], Tensor] | Float[Tensor, "batch pos ..."]
    layers: LayerSpec = None
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def _sources(self, model: ExpertModel) -> dict[int | None, Tensor]:
        layers = self.layers
        if isinstance(self.source, dict) and layers is None and self.point not in MODEL_POINTS:
            layers = sorted(k[1] for k in self.source if k[0] == self.point)
            if not layers:
                raise ValueError(
                    f"Patch: the source has no entry for point {self.point!r}; keys are "
                    f"{sorted(self.source, key=str)}"
                )
        out = {}
        for layer in point_layers(model, self.point, layers, "Patch"):
            if isinstance(self.source, dict):
                if (self.point, layer) not in self.source:
                    raise ValueError(
                        f"Patch: the source has no ({self.point!r}, {layer}) entry; keys are "
                        f"{sorted(self.source, key=str)}"
                    )
                src = self.source[(self.point, layer)]
            elif isinstance(self.source, Tensor):
                src = self.source
            else:
                raise TypeError("Patch: source must be a dict from cache_points or a [b, p, ...] tensor")
            shape = point_shape(model, self.point, layer)
            if src.dim() != 2 + len(shape) or tuple(src.shape[2:]) != shape:
                raise ValueError(
                    f"Patch: source for {self.point!r} layer {layer} has shape {tuple(src.shape)}; accepted "
                    f"is [batch, pos, {', '.join(map(str, shape))}]"
                )
            if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                bad = int((~torch.isfinite(src)).sum())
                raise ValueError(
                    f"Patch: source for {self.point!r} layer {layer} contains {bad} NaN/inf value(s); only finite "
                    "sources are accepted (was the source run itself broken?)"
                )
            out[layer] = src.detach().to(model.device)
        return out

    def validate(self, model: ExpertModel) -> None:
        Positions.coerce(self.positions)
        self._sources(model)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, rows = Positions.coerce(self.positions), self.rows
        handles = []
        for layer, src in self._sources(model).items():

            def edit(x, ctx, src=src, layer=layer):
                b, p = x.shape[:2]
                if src.shape[0] != b or (ctx.step == 0 and src.shape[1] != p):
                    raise ValueError(
                        f"Patch at {self.point!r} layer {layer}: source shape {tuple(src.shape)} "
                        "does not match "
                        f"the run's {tuple(x.shape)}; the batch and padded length must be the same"
                    )
                absolute = ctx.positions if ctx.positions is not None else torch.arange(p)
                absolute = absolute.to(src.device)
                inside = absolute < src.shape[1]  # past the source (generated tokens): kept as they are
                gathered = src[:, absolute.clamp(max=src.shape[1] - 1)].to(x)
                sel = token_selection(pos, rows, ctx, x)
                keep = inside.unsqueeze(0).expand(b, p)
                sel = keep if sel is None else sel & keep
                return apply_masked(x, gathered, sel)

            handles.append(model.add_edit(self.point, edit, layer=layer))
        return handles
