"""Per-expert interventions: expert-weighted steering of the MoE output (method B), expert scaling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..direction import Direction
from ..edits import record
from .base import Intervention
from .selectors import Positions, check_scalar, check_vector, resolve_experts, resolve_layers, token_selection

if TYPE_CHECKING:
    from ..edits import EditHandle, Recording
    from ..model import ExpertModel

__all__ = ["ExpertSteer", "AllExpertsSteer", "ScaleExpert", "WEIGHTINGS"]

WEIGHTINGS = ("router_prob", "routed_only", "constant")


def _after_recording(model: ExpertModel, rec: Recording, point: str, fn, layer: int) -> list[EditHandle]:
    """The recording's handles plus one edit at ``point`` (the recording is removed if attaching fails)."""
    try:
        return [*rec.handles, model.add_edit(point, fn, layer=layer)]
    except BaseException:
        rec.remove()
        raise


def _masked_add(out: Tensor, delta: Tensor, sel: Tensor | None) -> Tensor:
    if sel is not None:
        delta = delta * sel.unsqueeze(-1).to(delta.dtype)
    return out + delta.to(out)


@dataclass(frozen=True, eq=False, repr=False)
class ExpertSteer(Intervention):
    """Steer through one expert: ``moe.output ← moe.output + coeff · π_e(t) · d``.

    ``weighting`` sets ``π_e(t)``:

    * ``"router_prob"`` — the router's score for expert ``e`` at token ``t`` over *all* experts
      (``router_probs[..., e]``: full softmax; sigmoid score for deepseek_v3/glm4_moe), whether
      or not ``e`` is selected (the paper's method B).
    * ``"routed_only"`` — ``w_e(t)``, the real routing weight where ``e`` is in the top-k, 0
      elsewhere. Exactly equal to adding ``coeff·d`` to expert ``e``'s ``expert_out`` slot.
    * ``"constant"`` — 1 everywhere (plain addition to the MoE output).

    Scores are read from the final router logits of the same forward, so routing edits attached
    before this one are taken into account.

    Example:
        >>> import torch
        >>> from expertlens.interventions import ExpertSteer
        >>> ExpertSteer(layer=1, expert=2, direction=torch.randn(64), coeff=4.0).weighting
        'router_prob'
    """

    layer: int
    expert: int
    direction: Direction | Tensor
    coeff: float = 1.0
    weighting: str = "router_prob"
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        resolve_experts(model, {self.layer: [self.expert]}, "ExpertSteer")
        check_scalar(self.coeff, "ExpertSteer: coeff")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"ExpertSteer: weighting={self.weighting!r}; accepted are {WEIGHTINGS}")
        check_vector(model, self.direction, (model.d_model,), "ExpertSteer")
        Positions.coerce(self.positions)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        ((layer, _),) = resolve_experts(model, {self.layer: [self.expert]}, "ExpertSteer").items()
        d = check_vector(model, self.direction, (model.d_model,), "ExpertSteer")
        pos, rows, coeff, e = Positions.coerce(self.positions), self.rows, float(self.coeff), self.expert
        needs = {"router_prob": ["moe.router_probs"], "routed_only": ["moe.topk_indices", "moe.topk_weights"]}
        rec = record(model, [(name, layer) for name in needs.get(self.weighting, [])])

        def steer(out, ctx):
            if self.weighting == "router_prob":
                pi = rec[("moe.router_probs", layer)][..., e]
            elif self.weighting == "routed_only":
                idx, w = rec[("moe.topk_indices", layer)], rec[("moe.topk_weights", layer)]
                pi = (w * (idx == e).to(w.dtype)).sum(-1)
            else:
                pi = torch.ones(out.shape[:-1], dtype=out.dtype, device=out.device)
            delta = (coeff * pi.to(out)).unsqueeze(-1) * d.to(out)
            return _masked_add(out, delta, token_selection(pos, rows, ctx, out))

        return _after_recording(model, rec, "moe.output", steer, layer)


@dataclass(frozen=True, eq=False, repr=False)
class AllExpertsSteer(Intervention):
    """Router-probability-weighted steering with one direction per expert:
    ``moe.output ← moe.output + coeff · Σ_e π_e(t) · d_e`` with ``π = router_probs``.

    Example:
        >>> import torch
        >>> from expertlens.interventions import AllExpertsSteer
        >>> s = AllExpertsSteer(layer=1, directions=torch.randn(8, 64), coeff=2.0)
    """

    layer: int
    directions: Float[Tensor, "n_experts d_model"]
    coeff: float = 1.0
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        resolve_experts(model, {self.layer: []}, "AllExpertsSteer")
        check_scalar(self.coeff, "AllExpertsSteer: coeff")
        check_vector(
            model, self.directions, (model.n_experts, model.d_model), "AllExpertsSteer", allow_last=False
        )
        Positions.coerce(self.positions)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        ((layer, _),) = resolve_experts(model, {self.layer: []}, "AllExpertsSteer").items()
        D = check_vector(
            model, self.directions, (model.n_experts, model.d_model), "AllExpertsSteer", allow_last=False
        )
        pos, rows, coeff = Positions.coerce(self.positions), self.rows, float(self.coeff)
        rec = record(model, [("moe.router_probs", layer)])

        def steer(out, ctx):
            pi = rec[("moe.router_probs", layer)].to(out)
            delta = coeff * (pi @ D.to(out))
            return _masked_add(out, delta, token_selection(pos, rows, ctx, out))

        return _after_recording(model, rec, "moe.output", steer, layer)


@dataclass(frozen=True, eq=False, repr=False)
class ScaleExpert(Intervention):
    """Scale one routed expert's output: ``expert_out[slot] ← α·expert_out[slot]`` wherever expert
    ``e`` of layer ``l`` is selected (routing weights untouched), so the MoE output changes by
    ``(α−1)·w_e·E_e(x)``. ``α = 0`` removes the expert's contribution (its routing weight is not
    redistributed).

    Example:
        >>> from expertlens.interventions import ScaleExpert
        >>> ScaleExpert(layer=1, expert=3, alpha=0.0)
        ScaleExpert(layer=1, expert=3, alpha=0.0)
    """

    layer: int
    expert: int
    alpha: float
    positions: Positions | str | Sequence[int] | None = None
    rows: Any = None

    def validate(self, model: ExpertModel) -> None:
        resolve_experts(model, {self.layer: [self.expert]}, "ScaleExpert")
        check_scalar(self.alpha, "ScaleExpert: alpha")
        Positions.coerce(self.positions)

    def attach(self, model: ExpertModel) -> list[EditHandle]:
        (layer,) = resolve_layers(model, self.layer, moe_only=True)
        pos, rows, alpha, e = Positions.coerce(self.positions), self.rows, float(self.alpha), self.expert
        rec = record(model, [("moe.topk_indices", layer)])

        def scale(out, ctx):
            hit = (rec[("moe.topk_indices", layer)] == e).unsqueeze(-1)  # [b, p, k, 1]
            sel = token_selection(pos, rows, ctx, out)
            if sel is not None:
                hit = hit & sel[:, :, None, None]
            return torch.where(hit, out * alpha, out)

        return _after_recording(model, rec, "moe.expert_out", scale, layer)
