"""Controls and the attention question: pathway ablations of the refusal direction.

Example:
    >>> from expertlens.refusal.controls import pathway_shares
    >>> pathway_shares(base=4.0, scores={"attention": 3.0, "moe": 2.0, "both": 0.0})
    {'attention': 0.25, 'moe': 0.5, 'both': 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ..interventions import AblateDirection
from .evaluate import mean_refusal_score, refusal_rate
from .scores import Judge

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = ["PATHWAYS", "PathwayResult", "pathway_shares", "pathway_ablation"]

#: Which residual writes each pathway ablation removes the direction from.
PATHWAYS: dict[str, tuple[str, ...]] = {
    "attention": ("attn",),
    "moe": ("mlp",),
    "both": ("resid_pre", "attn", "mlp"),
}


def pathway_shares(base: float, scores: dict[str, float]) -> dict[str, float]:
    """Each pathway's share of the full ablation's effect: ``(base − s_x) / (base − s_both)``.

    Example:
        >>> from expertlens.refusal import pathway_shares
        >>> pathway_shares(2.0, {"attn": 1.5, "moe": 0.0, "both": -2.0})
        {'attn': 0.125, 'moe': 0.5, 'both': 1.0}
    """
    full = base - scores["both"]
    if abs(full) < 1e-12:
        return {k: math.nan for k in scores}
    return {k: (base - v) / full for k, v in scores.items()}


@dataclass
class PathwayResult:
    """Refusal score and rate on harmful prompts with the direction ablated from each pathway.

    Example:
        >>> from expertlens.refusal import PathwayResult
        >>> r = PathwayResult(2.0, 1.0, {"attn": 1.5, "moe": 0.5, "both": -1.0}, {"attn": 1.0, "moe": 0.6, "both": 0.0})
        >>> r.to_dict()["base_score"]
        2.0
    """

    base_score: float
    base_rate: float
    scores: dict[str, float]
    rates: dict[str, float]
    shares: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "base_score": self.base_score,
            "base_refusal": self.base_rate,
            "refusal_score": self.scores,
            "harmful_refusal": self.rates,
            "shares": self.shares,
        }


def pathway_ablation(
    model: ExpertModel,
    direction: Tensor,
    harmful: Sequence[str],
    refusal_ids: Sequence[int],
    *,
    base_rate: float | None = None,
    max_new_tokens: int = 16,
    judge: Judge | None = None,
    temperature: float | None = None,
    batch_size: int = 32,
) -> PathwayResult:
    """Ablate ``direction`` from attention writes only, MoE/MLP writes only, and everything.

    Shares are computed on the refusal score: how much of the full ablation's drop each pathway
    alone achieves (shares need not sum to 1: the pathways interact through later layers).

    Example:
        >>> from expertlens import load_organism
        >>> model = load_organism()  # doctest: +SKIP
        >>> from expertlens.refusal import pathway_ablation, refusal_token_ids
        >>> result = pathway_ablation(model, r, harmful_test, refusal_token_ids(model.tokenizer))  # doctest: +SKIP
        >>> result.shares   # how much of the full ablation's effect each pathway carries  # doctest: +SKIP
    """
    base = mean_refusal_score(model, harmful, refusal_ids, (), temperature, batch_size)
    if base_rate is None:
        base_rate, _ = refusal_rate(model, harmful, (), max_new_tokens, judge, batch_size)
    scores, rates = {}, {}
    for name, writes in PATHWAYS.items():
        ablate = [AblateDirection(direction, writes=writes)]
        scores[name] = mean_refusal_score(model, harmful, refusal_ids, ablate, temperature, batch_size)
        rates[name], _ = refusal_rate(model, harmful, ablate, max_new_tokens, judge, batch_size)
    return PathwayResult(base, base_rate, scores, rates, pathway_shares(base, scores))
