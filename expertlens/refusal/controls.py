"""Controls and the attention question: pathway ablations of the refusal direction, and the KL-matched
coefficient of the random-expert control (:func:`match_kl`).

Example:
    >>> from expertlens.refusal.controls import pathway_shares
    >>> pathway_shares(base=4.0, scores={"attention": 3.0, "moe": 2.0, "both": 0.0})
    {'attention': 0.25, 'moe': 0.5, 'both': 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ..interventions import AblateDirection
from .evaluate import mean_refusal_score, refusal_rate
from .scores import Judge

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = [
    "PATHWAYS",
    "PathwayResult",
    "pathway_shares",
    "pathway_ablation",
    "KLMatch",
    "match_kl",
    "KL_RTOL",
    "KL_ATOL",
]

#: A control's harmless KL matches a target when ``|kl - target| <= max(KL_RTOL * target, KL_ATOL)``.
KL_RTOL = 0.10
KL_ATOL = 0.005

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
    known_rates: dict[str, float] | None = None,
) -> PathwayResult:
    """Ablate ``direction`` from attention writes only, MoE/MLP writes only, and everything.

    Shares are computed on the refusal score: how much of the full ablation's drop each pathway
    alone achieves (shares need not sum to 1: the pathways interact through later layers).
    ``known_rates``: refusal rates of pathways already measured on the same prompts with the same judge,
    token budget and batch size (the study passes its directional-ablation condition as ``"both"``, which is
    the same computation); those are not generated again.

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
    known = dict(known_rates or {})
    if set(known) - set(PATHWAYS):
        raise ValueError(f"pathway_ablation: unknown pathways {sorted(set(known) - set(PATHWAYS))} in known_rates; "
                         f"accepted are {list(PATHWAYS)}")  # fmt: skip
    scores, rates = {}, {}
    for name, writes in PATHWAYS.items():
        ablate = [AblateDirection(direction, writes=writes)]
        scores[name] = mean_refusal_score(model, harmful, refusal_ids, ablate, temperature, batch_size)
        if name in known:
            rates[name] = float(known[name])
        else:
            rates[name], _ = refusal_rate(model, harmful, ablate, max_new_tokens, judge, batch_size)
    return PathwayResult(base, base_rate, scores, rates, pathway_shares(base, scores))


@dataclass
class KLMatch:
    """The coefficient :func:`match_kl` found: its KL, the target, whether it is within tolerance, every try.

    Example:
        >>> from expertlens.refusal.controls import match_kl
        >>> m = match_kl(lambda c: (c / 10) ** 2, target=4.0, start=1.0)
        >>> m.matched, abs(m.kl - 4.0) <= 0.4
        (True, True)
    """

    coeff: float
    kl: float
    target: float
    matched: bool
    tolerance: float
    tries: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"coeff": self.coeff, "kl": self.kl, "target": self.target, "matched": self.matched,
                "tolerance": self.tolerance, "tries": [list(t) for t in self.tries]}  # fmt: skip


def match_kl(
    kl_of: Callable[[float], float],
    target: float,
    start: float,
    *,
    rtol: float = KL_RTOL,
    atol: float = KL_ATOL,
    max_evals: int = 16,
    grow: float = 2.0,
    c_min: float | None = None,
    c_max: float | None = None,
) -> KLMatch:
    """The coefficient ``c > 0`` whose ``kl_of(c)`` matches ``target`` (KL grows with ``c``): bracket, then bisect.

    Starting at ``start``, the coefficient is multiplied (or divided) by ``grow`` until the KL crosses
    ``target``, then bisected geometrically until ``|kl - target| <= max(rtol * target, atol)`` or ``max_evals``
    evaluations are spent. Bounds default to ``start / 2^10`` and ``start * 2^10``. When no coefficient within the
    bounds reaches the target (the KL saturates, e.g. an expert that rarely fires), the closest try is returned
    with ``matched=False`` — the caller must say so.

    Example:
        >>> from expertlens.refusal.controls import match_kl
        >>> m = match_kl(lambda c: 1 - 2 ** -c, target=2.0, start=1.0, max_evals=8)   # KL never exceeds 1
        >>> m.matched, m.kl <= 1
        (False, True)
    """
    if not (target >= 0 and math.isfinite(target)):
        raise ValueError(f"match_kl: target KL must be finite and >= 0, got {target!r}")
    if not (start > 0 and math.isfinite(start)):
        raise ValueError(f"match_kl: start coefficient must be a positive number, got {start!r}")
    if grow <= 1:
        raise ValueError(f"match_kl: grow must be > 1, got {grow!r}")
    lo_bound = start / 2**10 if c_min is None else c_min
    hi_bound = start * 2**10 if c_max is None else c_max
    tol = max(rtol * target, atol)
    tries: list[tuple[float, float]] = []

    def f(c: float) -> float:
        kl = float(kl_of(c))
        tries.append((float(c), kl))
        return kl

    def done() -> KLMatch:
        c, kl = min(tries, key=lambda t: (abs(t[1] - target), t[0]))
        return KLMatch(c, kl, float(target), abs(kl - target) <= tol, tol, tries)

    k = f(start)
    if abs(k - target) <= tol:
        return done()
    lo = hi = None
    c = start
    if k < target:  # grow until the KL passes the target
        lo = c
        while len(tries) < max_evals and c < hi_bound:
            c = min(c * grow, hi_bound)
            k = f(c)
            if abs(k - target) <= tol:
                return done()
            if k > target:
                hi = c
                break
            lo = c
    else:  # shrink until the KL falls below it
        hi = c
        while len(tries) < max_evals and c > lo_bound:
            c = max(c / grow, lo_bound)
            k = f(c)
            if abs(k - target) <= tol:
                return done()
            if k < target:
                lo = c
                break
            hi = c
    if lo is None or hi is None:
        return done()  # the target lies outside what the bounds reach
    while len(tries) < max_evals:
        mid = math.sqrt(lo * hi)
        k = f(mid)
        if abs(k - target) <= tol:
            break
        if k < target:
            lo = mid
        else:
            hi = mid
    return done()
