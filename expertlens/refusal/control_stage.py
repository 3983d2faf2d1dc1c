"""The like-for-like controls of methods A and B as one stage object of the study.

The stage gets from the run only what it needs: the model and settings, the routing statistics, the stage store
(for resume), how to evaluate a condition, how to measure harmless KL, and each layer's expert directions.

Example:
    >>> from expertlens.refusal.control_stage import ControlStage
    >>> stage = ControlStage(model, cfg, routing, stages, run.condition, run.harmless_kl,
    ...                      run.layer_directions, positions)  # doctest: +SKIP
    >>> stage.method_b(run.condition_by("method_b"), search_b["best"]).draws[0].bypass.kl  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import methods
from .config import RefusalConfig
from .controls import KL_ATOL, KL_RTOL, Expert, like_for_like_control, sample_like_for_like
from .results import Condition, ControlDraw, ExpertControl

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["ControlStage"]

#: Past this many times the calibrated logit range an edited expert is always (never) chosen: method A's KL saturates.
ROUTER_SCALE_MAX = 16.0


@dataclass
class ControlStage:
    """Draw, KL-match and evaluate the like-for-like control of method A or method B.

    Attributes:
        model: The studied model.
        cfg: The run's resolved settings (``expert_threshold``, ``n_control_draws``, ``seed``, ``method_a_kind``).
        routing: The routing stage's dict (``layers``, ``delta_pp``, ``selected``, ``method_b_experts``).
        stages: The run's stage store (``get`` / ``put``), so a resumed run reads finished controls back.
        evaluate: ``evaluate(key, label, bypass, induce, params, kls=, capability=)`` → :class:`Condition`.
        kl_of: Harmless KL on the test prompts under a list of edits (what every condition reports).
        layer_directions: ``layer → [P, E, d]`` expert directions (method B's own).
        positions: The token positions of those directions.

    Example:
        >>> from expertlens.refusal.control_stage import ControlStage
        >>> ControlStage.__dataclass_fields__.keys() >= {"routing", "kl_of"}
        True
    """

    model: ExpertModel
    cfg: RefusalConfig
    routing: dict
    stages: Any
    evaluate: Callable[..., Condition]
    kl_of: Callable[[list], float]
    layer_directions: Callable[[int], Tensor]
    positions: Sequence[int]

    def below(self, layer: int, exclude: set[tuple[int, int]]) -> list[Expert]:
        """Experts of ``layer`` with |Δ| below the threshold, leaving out ``exclude``."""
        rt, thr = self.routing, self.cfg.expert_threshold
        row = rt["delta_pp"][rt["layers"].index(layer)]
        return [(layer, e, float(d)) for e, d in enumerate(row) if abs(d) < thr and (layer, e) not in exclude]

    def rule(self, what: str) -> str:
        return (f"{what}; {self.cfg.n_control_draws} draws (seed {self.cfg.seed}); each draw's coefficient chosen "
                f"separately for the bypass and the induce edit so that the harmless KL on the test prompts under that "
                f"edit matches the method's under the same edit to within {100 * KL_RTOL:.0f}% (at least "
                f"{KL_ATOL:g} nats)")  # fmt: skip

    def run(self, method: Condition, label: str, template: Sequence[Expert], edits_of, start, rule: str,
            position: int | None = None, c_max: float | None = None) -> ExpertControl:  # fmt: skip
        """Draw stand-ins for ``template``, match each draw on ``method``'s KL per edit, evaluate one condition per
        draw (keys ``<method.key>_control_<i>``); a finished control is read back from the stage store."""
        key = method.key
        cached = self.stages.get(f"control_{key}", ExpertControl)
        if cached is not None and all(self.stages.get(f"condition_{d.key}", Condition) for d in cached.draws):
            for d in cached.draws:
                self.evaluate(d.key, "")  # read back
            return cached
        rt = self.routing
        exclude = {(x["layer"], x["expert"]) for x in rt["method_b_experts"] + rt["selected"]}
        pool = {lay: self.below(lay, exclude) for lay in sorted({a for a, _, _ in template})}
        draws = sample_like_for_like(template, pool, self.cfg.n_control_draws, self.cfg.seed)
        targets = {"bypass": float(method.harmless_kl), "induce": float(method.induce_kl)}
        ctrl, edits = like_for_like_control(key, draws, edits_of, self.kl_of, targets, start, rule, position, c_max)
        for i, (d, (byp, ind)) in enumerate(zip(ctrl.draws, edits)):
            params = dict(experts=", ".join(f"L{a} E{e}" for a, e in d.experts), bypass_coefficient=d.bypass.coeff,
                          induce_coefficient=d.induce.coeff, kl_matched=_matched_text(d))  # fmt: skip
            if position is not None:
                params["position"] = position
            kls = (d.bypass.kl, d.induce.kl)  # measured at exactly these coefficients by the match
            self.evaluate(d.key, f"{label}, draw {i + 1}", byp, ind, params, kls=kls, capability=False)
        return self.stages.put(f"control_{key}", ctrl)

    def method_b(self, b: Condition | None, best: dict | None) -> ExpertControl | None:
        """Random experts of method B's own layer, at its position, the same router-weighted steering."""
        from ..interventions import ExpertSteer

        if b is None or b.bypass is None or best is None:
            return None
        lay, pos, coeff = best["layer"], best["position"], float(best["coeff"])
        dirs = self.layer_directions(lay)[list(self.positions).index(pos)]

        def edits_of(experts, c, side):
            (_, e, _), d = experts[0], dirs[experts[0][1]].float()
            if not bool(d.isfinite().all()) or float(d.norm()) == 0.0:
                return None
            return [ExpertSteer(lay, e, d, coeff=-c if side == "bypass" else c, weighting="router_prob")]

        norm_b = float(dirs[best["expert"]].norm())

        def start(experts):  # the same push in norm: method B's coefficient times the ratio of direction norms
            n = float(dirs[experts[0][1]].norm())
            return coeff * norm_b / n if n > 0 and math.isfinite(n) and norm_b > 0 else coeff

        thr = self.cfg.expert_threshold
        what = (f"one random expert of method B's layer {lay} (|Δ| < {thr:g} pp, none that method B searched), its "
                f"direction at method B's position {pos}, steered the same way")  # fmt: skip
        own = [(lay, best["expert"], 0.0)]
        return self.run(b, "control for method B: random expert of its layer", own, edits_of, start, self.rule(what),
                        pos)  # fmt: skip

    def method_a(self, a: Condition | None) -> ExpertControl | None:
        """As many random below-threshold experts per layer as method A edits there, in the same roles."""
        from ..interventions import calibrate_router_bias

        if a is None or a.bypass is None:
            return None
        sel = [(x["layer"], x["expert"], x["delta"]) for x in self.routing["selected"]]
        kind = self.cfg.method_a_kind
        magnitudes = calibrate_router_bias(self.model, eps=0.01) if kind == "router_bias" else None

        def edits_of(experts, c, side):
            scaled = None if magnitudes is None else {k: c * v for k, v in magnitudes.items()}
            return [methods.method_a_intervention(self.model, experts, side, kind, magnitudes=scaled)]

        counts = ", ".join(f"{sum(x[0] == lay for x in sel)} in layer {lay}" for lay in sorted({x[0] for x in sel}))
        what = (f"random below-threshold experts of method A's layers, as many per layer ({counts}), each forced or "
                "suppressed in the role of the routing-linked expert it replaces, the same routing edit"
                + ("; the calibrated router-bias magnitudes scaled by one factor per edit (at most "
                   f"{ROUTER_SCALE_MAX:g}x)" if magnitudes else
                   "; SteerMoE's rewrite has no coefficient, so KL is reported, not matched"))  # fmt: skip
        return self.run(a, "control for method A: random experts of its layers", sel, edits_of, lambda experts: 1.0,
                        self.rule(what), c_max=ROUTER_SCALE_MAX)  # fmt: skip


def _matched_text(d: ControlDraw) -> str:
    sides = (("bypass", d.bypass), ("induce", d.induce))
    return ", ".join(f"{side} {'yes' if m.matched else 'no (closest)'}" for side, m in sides)
