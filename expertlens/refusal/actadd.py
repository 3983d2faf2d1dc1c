"""ActAdd coefficient sweep: how hard to push along the refusal direction, chosen on validation prompts.

Arditi et al. add the raw difference in means (coefficient 1). Some models need more: the sweep
measures refusal rates under ``−c·r`` (harmful prompts) and ``+c·r`` (harmless prompts) for each
coefficient and picks, per side, the smallest coefficient that reaches its target.

Example:
    >>> from expertlens.refusal.actadd import pick_coefficient
    >>> pick_coefficient([1, 2, 3], [0.9, 0.4, 0.05], target=0.1, lower_is_better=True)
    3
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ..interventions import AddVector
from .evaluate import refusal_rate
from .progress import progress
from .scores import Judge

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["ActAddSweep", "actadd_sweep", "pick_coefficient"]


def pick_coefficient(coeffs: Sequence[float], rates: Sequence[float], target: float, lower_is_better: bool) -> float:
    """The smallest coefficient whose rate reaches ``target``; else the one with the best rate (smallest on ties).

    Example:
        >>> from expertlens.refusal.actadd import pick_coefficient
        >>> pick_coefficient([1, 2, 4], [0.1, 0.6, 0.95], target=0.9, lower_is_better=False)
        4
    """
    order = sorted(range(len(coeffs)), key=lambda i: coeffs[i])
    for i in order:
        if (rates[i] <= target) if lower_is_better else (rates[i] >= target):
            return coeffs[i]
    best = min(order, key=lambda i: (rates[i] if lower_is_better else -rates[i], coeffs[i]))
    return coeffs[best]


@dataclass
class ActAddSweep:
    """Refusal rates per coefficient and the coefficients chosen for bypass and induction.

    Example:
        >>> from expertlens.refusal.actadd import ActAddSweep
        >>> sweep = ActAddSweep(3, [1.0, 2.0], [0.8, 0.1], [0.1, 0.95], bypass_coeff=2.0, induce_coeff=2.0)
        >>> sweep.to_dict()["bypass_coeff"]
        2.0
    """

    layer: int
    coeffs: list[float]
    harmful_refusal: list[float]
    harmless_refusal: list[float]
    bypass_coeff: float
    induce_coeff: float
    targets: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "coeffs": self.coeffs,
            "harmful_refusal_under_minus": self.harmful_refusal,
            "harmless_refusal_under_plus": self.harmless_refusal,
            "bypass_coeff": self.bypass_coeff,
            "induce_coeff": self.induce_coeff,
            "targets": self.targets,
        }


def actadd_sweep(
    model: ExpertModel,
    direction: Tensor,
    layer: int,
    harmful: Sequence[str],
    harmless: Sequence[str],
    coeffs: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    *,
    bypass_target: float = 0.1,
    induce_target: float = 0.9,
    max_new_tokens: int = 16,
    judge: Judge | None = None,
    batch_size: int = 32,
) -> ActAddSweep:
    """Generation refusal rates under ``∓c·r`` at ``layer``'s input for each ``c`` (use validation prompts).

    Example:
        >>> from expertlens import load_organism
        >>> from expertlens.refusal.actadd import actadd_sweep
        >>> model = load_organism()  # doctest: +SKIP
        >>> sweep = actadd_sweep(model, r, layer, harmful_val, harmless_val, coeffs=(1, 2, 3))  # doctest: +SKIP
        >>> sweep.bypass_coeff, sweep.induce_coeff  # doctest: +SKIP
    """
    coeffs = sorted(float(c) for c in coeffs)
    if not coeffs or any(c <= 0 for c in coeffs):
        raise ValueError(f"ActAdd coefficients must be positive, got {coeffs}")
    harm, safe = [], []
    for c in progress(coeffs, desc="ActAdd coefficient sweep"):
        h, _ = refusal_rate(
            model,
            harmful,
            [AddVector("resid_pre", direction, coeff=-c, layers=layer)],
            max_new_tokens,
            judge,
            batch_size,
        )
        s, _ = refusal_rate(
            model,
            harmless,
            [AddVector("resid_pre", direction, coeff=c, layers=layer)],
            max_new_tokens,
            judge,
            batch_size,
        )
        harm.append(h)
        safe.append(s)
    return ActAddSweep(
        layer,
        coeffs,
        harm,
        safe,
        pick_coefficient(coeffs, harm, bypass_target, lower_is_better=True),
        pick_coefficient(coeffs, safe, induce_target, lower_is_better=False),
        {"bypass": bypass_target, "induce": induce_target},
    )
