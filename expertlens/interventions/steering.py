"""Activation edits at any point: addition, zero / mean ablation, expert scaling, patching."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..direction import Direction
from ..model import PointError
from .base import Intervention
from .selectors import (
    MODEL_POINTS,
    LayerSpec,
    Positions,
    apply_masked,
    check_point,
    check_scalar,
    check_vector,
    point_shape,
    resolve_layers,
    token_selection,
)

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["AddVector", "ZeroAblate", "MeanAblate", "ScaleExpert", "Patch", "cache_points"]


def point_layers(model: ExpertModel, point: str, layers: LayerSpec, what: str) -> list[int | None]:
    """The layers an edit at ``point`` attaches to (``[None]`` for model-level points)."""
    check_point(point, what)
    if point in MODEL_POINTS:
        if layers is not None:
            raise PointError(f"{what}: point {point!r} is model-level; leave layers=None")
        return [None]
    return list(resolve_layers(model, layers, moe_only=point.startswith("moe."), what=f"{what}: "))


def _add(model: ExpertModel, point: str, layer: int | None, fn) -> EditHandle:
    return model.add_edit(point, fn, layer=layer)


@dataclass(frozen=True, eq=False)
class AddVector(Intervention):
    """Activation addition: ``x ← x + coeff·v`` at a point, on selected layers, positions and rows.

    ``v`` is ``[d]`` for residual-stream points (or the point's trailing shape, e.g.
    ``[heads, d_head]`` for ``attn.z``; a last-dimension vector broadcasts). It applies on every
    forward while attached: traces, each generation step (KV cache on), plain calls. Its dtype and
    device are converted to the model's; a wrong size or a non-finite value is an error.

    Example:
        >>> import torch
        >>> from expertlens import ExpertModel
        >>> from expertlens.testing import tiny_model, tiny_tokenizer
        >>> from expertlens.interventions import AddVector, Positions
        >>> model = ExpertModel(tiny_model("olmoe"), tiny_tokenizer())
        >>> steer = AddVector("resid_pre", torch.ones(64), coeff=2.0, layers=1, positions=Positions.last(1))
        >>> with model.intervene(steer), model.trace("hello"):
        ...     x = model.layers[1].resid_pre.save()
    """

    point: str
    vector: Direction | Tensor
    coeff: float = 1.0
    layers: LayerSpec = None
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        what = type(self).__name__
        check_scalar(self.coeff, f"{what}: coeff")
        Positions.coerce(self.positions)
        for layer in point_layers(model, self.point, self.layers, what):
            if self.point == "moe.topk_indices":
                raise PointError(f"{what}: 'moe.topk_indices' holds integers; add to a float point instead")
            check_vector(model, self.vector, point_shape(model, self.point, layer), f"{what} at {self.point}")

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, coeff, rows = Positions.coerce(self.positions), float(self.coeff), self.rows
        handles = []
        for layer in point_layers(model, self.point, self.layers, "AddVector"):
            v = check_vector(model, self.vector, point_shape(model, self.point, layer), "AddVector")
            delta = coeff * v

            def edit(x, ctx, delta=delta):
                return apply_masked(x, x + delta.to(x), token_selection(pos, rows, ctx, x))

            handles.append(_add(model, self.point, layer, edit))
        return handles


@dataclass(frozen=True, eq=False)
class ZeroAblate(Intervention):
    """Zero ablation: ``x ← 0`` at a point on selected layers / positions / rows.

    Example:
        >>> from expertlens.interventions import ZeroAblate
        >>> ZeroAblate("attn.output", layers=0)  # knock out layer 0's attention
        ZeroAblate(point='attn.output', layers=0, positions=None, rows=None)
    """

    point: str
    layers: LayerSpec = None
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        point_layers(model, self.point, self.layers, "ZeroAblate")
        if self.point == "moe.topk_indices":
            raise PointError(
                "ZeroAblate: 'moe.topk_indices' holds expert ids; zeroing them is not an ablation"
            )
        Positions.coerce(self.positions)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, rows = Positions.coerce(self.positions), self.rows

        def edit(x, ctx):
            return apply_masked(x, torch.zeros_like(x), token_selection(pos, rows, ctx, x))

        return [
            _add(model, self.point, layer, edit) for layer in point_layers(model, self.point, self.layers, "")
        ]


@dataclass(frozen=True, eq=False)
class MeanAblate(Intervention):
    """Mean ablation: ``x ← μ`` at a point, with ``μ`` a vector (all layers), an ``[L, ...]``
    tensor indexed by layer, or a dict ``{layer: μ_l}`` (its keys are the layers when
    ``layers`` is None).

    Example:
        >>> import torch
        >>> from expertlens.interventions import MeanAblate
        >>> ab = MeanAblate("moe.output", {1: torch.zeros(64)})
    """

    point: str
    means: Tensor | Direction | dict[int, Tensor]
    layers: LayerSpec = None
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def _table(self, model: ExpertModel) -> dict[int | None, Tensor]:
        layers = self.layers
        if isinstance(self.means, dict) and layers is None and self.point not in MODEL_POINTS:
            layers = sorted(int(k) for k in self.means)
        out = {}
        for layer in point_layers(model, self.point, layers, "MeanAblate"):
            shape = point_shape(model, self.point, layer)
            if isinstance(self.means, dict):
                if layer not in self.means and (layer is None or layer - model.n_layers not in self.means):
                    raise ValueError(
                        f"MeanAblate: no mean given for layer {layer}; keys are {sorted(self.means)}"
                    )
                m = self.means.get(
                    layer, self.means.get(layer - model.n_layers if layer is not None else None)
                )
            elif isinstance(self.means, Tensor) and self.means.dim() == len(shape) + 1 and layer is not None:
                if self.means.shape[0] != model.n_layers:
                    raise ValueError(
                        f"MeanAblate: means has shape {tuple(self.means.shape)}; a per-layer table must be "
                        f"[{model.n_layers}, {', '.join(map(str, shape))}]"
                    )
                m = self.means[layer]
            else:
                m = self.means
            out[layer] = check_vector(model, m, shape, f"MeanAblate at {self.point} layer {layer}")
        return out

    def validate(self, model: ExpertModel) -> None:
        if self.point == "moe.topk_indices":
            raise PointError("MeanAblate: 'moe.topk_indices' holds expert ids")
        Positions.coerce(self.positions)
        self._table(model)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, rows = Positions.coerce(self.positions), self.rows
        handles = []
        for layer, mu in self._table(model).items():

            def edit(x, ctx, mu=mu):
                return apply_masked(
                    x, mu.to(x).expand_as(x).clone(), token_selection(pos, rows, ctx, x)
                )

            handles.append(_add(model, self.point, layer, edit))
        return handles


@dataclass(frozen=True, eq=False)
class ScaleExpert(Intervention):
    """Scale one routed expert's output: ``expert_out[slot] ← α·expert_out[slot]`` wherever expert
    ``e`` of layer ``l`` is selected (routing weights untouched), so the MoE output changes by
    ``(α−1)·w_e·E_e(x)``. ``α = 0`` removes the expert's contribution (its routing weight is not
    redistributed).

    Example:
        >>> from expertlens.interventions import ScaleExpert
        >>> ScaleExpert(layer=1, expert=3, alpha=0.0)
        ScaleExpert(layer=1, expert=3, alpha=0.0, positions=None, rows=None)
    """

    layer: int
    expert: int
    alpha: float
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        from .selectors import resolve_experts

        resolve_experts(model, {self.layer: [self.expert]}, "ScaleExpert")
        check_scalar(self.alpha, "ScaleExpert: alpha")
        Positions.coerce(self.positions)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        (layer,) = resolve_layers(model, self.layer, moe_only=True)
        pos, rows, alpha, e = Positions.coerce(self.positions), self.rows, float(self.alpha), self.expert
        stash: dict[str, Tensor] = {}

        def grab(idx, ctx):
            stash["idx"] = idx
            return idx

        def scale(out, ctx):
            hit = (stash.pop("idx") == e).unsqueeze(-1)  # [b, p, k, 1]
            sel = token_selection(pos, rows, ctx, out)
            if sel is not None:
                hit = hit & sel[:, :, None, None]
            return torch.where(hit, out * alpha, out)

        return [
            model.add_edit("moe.topk_indices", grab, layer=layer),
            model.add_edit("moe.expert_out", scale, layer=layer),
        ]


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------


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
    out: dict[tuple[str, int | None], Tensor] = {}
    handles = []
    try:
        with model.intervene(*interventions):
            for point, lay in wanted:

                def rec(x, ctx, key=(point, lay)):
                    out[key] = x.detach().clone()
                    return x

                handles.append(model.add_edit(point, rec, layer=lay))
            enc = model.tokenize(prompts if isinstance(prompts, list) else [prompts])
            with torch.no_grad():
                model.hf_model(**enc, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


@dataclass(frozen=True, eq=False)
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

            handles.append(_add(model, self.point, layer, edit))
        return handles
