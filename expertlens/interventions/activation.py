"""Activation edits at any point: addition, zero and mean ablation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..direction import Direction
from ..points import MODEL_POINTS, PointError
from .base import Intervention
from .selectors import (
    LayerSpec,
    Positions,
    apply_masked,
    check_point,
    check_scalar,
    check_vector,
    layer_keys,
    point_shape,
    resolve_layers,
    token_selection,
)

if TYPE_CHECKING:
    from ..model import EditHandle, ExpertModel

__all__ = ["AddVector", "ZeroAblate", "MeanAblate"]


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


@dataclass(frozen=True, eq=False, repr=False)
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
            check_vector(model, self.vector, point_shape(model, self.point, layer), f"{what} at {self.point}",
                         scale=float(self.coeff))

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        pos, coeff, rows = Positions.coerce(self.positions), float(self.coeff), self.rows
        handles = []
        for layer in point_layers(model, self.point, self.layers, "AddVector"):
            v = check_vector(model, self.vector, point_shape(model, self.point, layer), "AddVector", scale=coeff)
            delta = coeff * v

            def edit(x, ctx, delta=delta):
                return apply_masked(x, x + delta.to(x), token_selection(pos, rows, ctx, x))

            handles.append(_add(model, self.point, layer, edit))
        return handles


@dataclass(frozen=True, eq=False, repr=False)
class ZeroAblate(Intervention):
    """Zero ablation: ``x ← 0`` at a point on selected layers / positions / rows.

    Example:
        >>> from expertlens.interventions import ZeroAblate
        >>> ZeroAblate("attn.output", layers=0)  # knock out layer 0's attention
        ZeroAblate(point='attn.output', layers=0)
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


@dataclass(frozen=True, eq=False, repr=False)
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
        if isinstance(self.means, dict) and self.point not in MODEL_POINTS:
            keyed = layer_keys(model, self.means, "MeanAblate", moe_only=self.point.startswith("moe."))
            layers = sorted(keyed) if layers is None else layers
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
