"""Controls and the attention question: pathway ablations of the refusal direction, and the like-for-like
random-expert controls (:func:`sample_like_for_like` draws experts from a method's own layers,
:func:`like_for_like_control` matches each draw's coefficients on the method's KL, edit by edit, with
:func:`match_kl`).

Example:
    >>> from expertlens.refusal.controls import pathway_shares
    >>> pathway_shares(base=4.0, scores={"attention": 3.0, "moe": 2.0, "both": 0.0})
    {'attention': 0.25, 'moe': 0.5, 'both': 1.0}
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..interventions import AblateDirection
from ..interventions.base import Intervention
from .evaluate import last_logits, refusal_rate
from .results import ControlDraw, ExpertControl, KLMatch
from .scores import Judge, refusal_score
from .stats import LEVEL, N_BOOT, ratio_interval

if TYPE_CHECKING:
    from ..model import ExpertModel

__all__ = [
    "PATHWAYS",
    "PathwayResult",
    "pathway_shares",
    "pathway_ablation",
    "KLMatch",
    "match_kl",
    "sample_like_for_like",
    "like_for_like_control",
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
    share_intervals: dict[str, list[float]] = field(default_factory=dict)
    drop_interval: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "base_score": self.base_score,
            "base_refusal": self.base_rate,
            "refusal_score": self.scores,
            "harmful_refusal": self.rates,
            "shares": self.shares,
            "share_intervals": self.share_intervals,
            "drop_interval": self.drop_interval,
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
    alone achieves (shares need not sum to 1: the pathways interact through later layers). ``share_intervals``
    are 95% bootstrap intervals over the prompts (:func:`~expertlens.refusal.stats.ratio_interval`), and
    ``drop_interval`` the interval of the full ablation's mean drop (the shares mean nothing unless it is > 0).
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
    def per_prompt(edits) -> np.ndarray:
        return refusal_score(last_logits(model, harmful, edits, batch_size), refusal_ids, temperature).double().numpy()

    base_pp = per_prompt(())
    base = float(base_pp.mean())
    if base_rate is None:
        base_rate, _ = refusal_rate(model, harmful, (), max_new_tokens, judge, batch_size)
    known = dict(known_rates or {})
    if set(known) - set(PATHWAYS):
        raise ValueError(f"pathway_ablation: unknown pathways {sorted(set(known) - set(PATHWAYS))} in known_rates; "
                         f"accepted are {list(PATHWAYS)}")  # fmt: skip
    scores, rates, drops = {}, {}, {}
    for name, writes in PATHWAYS.items():
        ablate = [AblateDirection(direction, writes=writes)]
        pp = per_prompt(ablate)
        scores[name], drops[name] = float(pp.mean()), base_pp - pp
        if name in known:
            rates[name] = float(known[name])
        else:
            rates[name], _ = refusal_rate(model, harmful, ablate, max_new_tokens, judge, batch_size)
    intervals = {k: list(ratio_interval(v, drops["both"])) for k, v in drops.items()}
    both = drops["both"]
    rng = np.random.default_rng(0)
    boot = both[rng.integers(0, both.size, size=(N_BOOT, both.size))].mean(1)
    drop_iv = [float(x) for x in np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])]
    return PathwayResult(base, base_rate, scores, rates, pathway_shares(base, scores), intervals, drop_iv)


def match_kl(
    kl_of: Callable[[float], float],
    target: float,
    start: float,
    *,
    rtol: float = KL_RTOL,
    atol: float = KL_ATOL,
    max_evals: int = 16,
    grow: float = 16.0,
    c_min: float | None = None,
    c_max: float | None = None,
) -> KLMatch:
    """The coefficient ``c > 0`` whose ``kl_of(c)`` matches ``target`` (KL grows with ``c``): bracket, then
    interpolate.

    Small pushes give a KL quadratic in the coefficient, so each step assumes ``KL ∝ c^p`` locally: while only one
    side of the target is known, the next coefficient is ``c · 1.1·sqrt(target / kl)`` (p = 2, aiming a little past
    the target so that it gets bracketed), by a factor between 1.1 and ``grow``; once bracketed, the log-log line
    through the two nearest tries gives the next (kept inside the bracket's middle 80% in log space, so every step
    shrinks it). It stops when ``|kl - target| <= max(rtol * target, atol)`` or ``max_evals`` evaluations are spent.
    Bounds default to ``start / 2^10`` and ``start * 2^10``. When no coefficient within the bounds reaches the target
    (the KL saturates, e.g. an expert that rarely fires), the closest try is returned with ``matched=False`` — the
    caller must say so; tries within numerical noise (1e-4 relative) of the closest count as tied, and the smallest
    coefficient wins, so the pick does not depend on rounding.

    Example:
        >>> from expertlens.refusal.controls import match_kl
        >>> m = match_kl(lambda c: 1 - 2 ** -c, target=2.0, start=1.0, max_evals=8)   # KL never exceeds 1
        >>> m.matched, m.kl <= 1
        (False, True)
        >>> [round(c, 3) for c, _ in match_kl(lambda c: (c / 10) ** 2, target=4.0, start=1.0).tries]
        [1.0, 16.0, 22.0, 20.0]
        >>> flat = match_kl(lambda c: 0.2650 + 1e-7 * (c > 15), target=2.0, start=4.0, c_max=16.0)  # saturated
        >>> flat.matched, flat.coeff < 16
        (False, True)
    """
    if not (target >= 0 and math.isfinite(target)):
        raise ValueError(f"match_kl: target KL must be finite and >= 0, got {target!r}")
    if not (start > 0 and math.isfinite(start)):
        raise ValueError(f"match_kl: start coefficient must be a positive number, got {start!r}")
    if grow <= 1.1:
        raise ValueError(f"match_kl: grow must be > 1.1, got {grow!r}")
    lo_bound = start / 2**10 if c_min is None else c_min
    hi_bound = start * 2**10 if c_max is None else c_max
    tol = max(rtol * target, atol)
    tries: list[list[float]] = []

    def done() -> KLMatch:
        # the closest try; tries within numerical noise of it (a saturated KL is flat, and a sharded or
        # differently batched run moves it in the 6th digit) count as equally close, and the gentlest wins, so
        # the pick does not flip with rounding
        best = min(abs(k - target) for _, k in tries)
        noise = max(1e-4 * max(target, best), 1e-6)
        c, kl = min((t for t in tries if abs(t[1] - target) <= best + noise), key=lambda t: t[0])
        return KLMatch(c, kl, float(target), abs(kl - target) <= tol, tol, tries)

    lo: tuple[float, float] | None = None  # the largest (c, kl) below the target
    hi: tuple[float, float] | None = None  # the smallest above it
    c = start
    while len(tries) < max_evals:
        k = float(kl_of(c))
        tries.append([float(c), k])
        if abs(k - target) <= tol:
            break
        if k < target:
            lo = (c, k) if lo is None or c > lo[0] else lo
        else:
            hi = (c, k) if hi is None or c < hi[0] else hi
        if lo is not None and hi is not None:
            (c0, k0), (c1, k1) = lo, hi
            span = math.log(c1 / c0)
            if k0 > 0 and k1 > k0:  # the log-log line through the bracket, kept inside its middle 80%
                x = (math.log(target) - math.log(k0)) / (math.log(k1) - math.log(k0))
            else:
                x = 0.5
            c = c0 * math.exp(span * min(max(x, 0.1), 0.9))
        elif hi is None:  # still below: grow
            if c >= hi_bound:
                break
            factor = 1.1 * math.sqrt(target / k) if k > 0 else grow
            c = min(c * min(max(factor, 1.1), grow), hi_bound)
        else:  # still above: shrink
            if c <= lo_bound:
                break
            factor = 1.1 * math.sqrt(k / target) if target > 0 else grow
            c = max(c / min(max(factor, 1.1), grow), lo_bound)
    return done()


#: An expert of a method or of a control: ``(layer, expert, Δ)``; Δ (pp) gives its role in a routing edit.
Expert = tuple[int, int, float]


def sample_like_for_like(
    template: Sequence[Expert],
    candidates: dict[int, Sequence[Expert]],
    n_draws: int,
    seed: int = 42,
) -> list[list[Expert]]:
    """``n_draws`` random stand-ins for ``template``: the same layers, the same number of experts per layer.

    Each stand-in takes the Δ of the expert it replaces (so a routing edit forces or suppresses it in the same
    role); ``candidates[layer]`` are the experts it may be drawn from (the caller leaves out the method's own and
    every routing-linked one). Within a layer the candidates are shuffled once (seeded) and dealt out in turn, so
    draws share no expert until the layer's pool is used up; a layer with fewer candidates than the template needs
    gives no draws.

    Example:
        >>> from expertlens.refusal.controls import sample_like_for_like
        >>> pool = {5: [(5, e, 0.0) for e in range(8) if e != 4]}
        >>> draws = sample_like_for_like([(5, 4, 12.0)], pool, n_draws=3)
        >>> [[(lay, e != 4, d) for lay, e, d in draw] for draw in draws]
        [[(5, True, 12.0)], [(5, True, 12.0)], [(5, True, 12.0)]]
        >>> len({draw[0][1] for draw in draws})   # three different experts
        3
    """
    rng = random.Random(seed)
    need: dict[int, list[float]] = {}
    for layer, _, delta in template:
        need.setdefault(int(layer), []).append(float(delta))
    pools: dict[int, list[Expert]] = {}
    for layer, deltas in need.items():
        pool = list(candidates.get(layer, []))
        if len(pool) < len(deltas):
            return []
        rng.shuffle(pool)
        pools[layer] = pool
    draws, cursor = [], {layer: 0 for layer in need}
    for _ in range(n_draws):
        draw: list[Expert] = []
        for layer, deltas in need.items():
            pool, k = pools[layer], len(deltas)
            if cursor[layer] + k > len(pool):  # pool used up: deal again from a fresh shuffle
                rng.shuffle(pool)
                cursor[layer] = 0
            picked = pool[cursor[layer] : cursor[layer] + k]
            cursor[layer] += k
            draw += [(layer, int(e), d) for (_, e, _), d in zip(picked, deltas)]
        draws.append(draw)
    return draws


def like_for_like_control(
    method: str,
    draws: Sequence[Sequence[Expert]],
    edits_of: Callable[[Sequence[Expert], float, str], list[Intervention] | None],
    kl_of: Callable[[list[Intervention]], float],
    targets: dict[str, float],
    start: Callable[[Sequence[Expert]], float],
    rule: str,
    position: int | None = None,
    c_max: float | None = None,
) -> tuple[ExpertControl, list[tuple[list[Intervention], list[Intervention]]]]:
    """Match each draw's coefficient on the method's harmless KL, separately for the bypass and the induce edit.

    ``edits_of(experts, c, side)`` builds the control's edit at coefficient (or scale) ``c > 0`` for ``side``
    (``"bypass"`` / ``"induce"``), or None when the draw cannot be steered (a zero or non-finite direction: the
    draw is skipped and the note says so); ``kl_of(edits)`` is the harmless KL the method's own number was measured
    with; ``targets[side]`` is the method's KL under that edit. ``start(experts)`` is the first bypass coefficient
    tried (a good guess saves evaluations, e.g. the method's coefficient scaled by the ratio of direction norms); the
    induce match starts from the matched bypass coefficient (the methods use one coefficient for both edits).
    ``c_max`` caps the coefficient (e.g. a router-bias scale past which routing is saturated).
    Returns the typed control (its draws keyed ``<method>_control_<i>``) and, per draw, the bypass and induce edits
    at the matched coefficients, for the caller to evaluate. No harmful prompt and no judged outcome enters the
    match.

    Example:
        >>> from expertlens.refusal.controls import like_for_like_control
        >>> ctrl, edits = like_for_like_control(
        ...     "method_b", [[(5, 7, 0.0)]], lambda ex, c, side: [c], lambda e: e[0] / 100,
        ...     targets={"bypass": 0.5, "induce": 1.0}, start=lambda experts: 10.0, rule="...")
        >>> [round(d.bypass.kl, 1) for d in ctrl.draws], [round(d.induce.kl, 1) for d in ctrl.draws]
        ([0.5], [1.0])
    """
    out, edits, skipped = [], [], []
    for i, draw in enumerate(draws):
        first = float(start(draw))
        if edits_of(draw, first, "bypass") is None:
            skipped.append(_experts_name(draw))
            continue
        match = {}
        for side in ("bypass", "induce"):

            def kl_at(c: float, side: str = side, draw: Sequence[Expert] = draw) -> float:
                return kl_of(edits_of(draw, c, side))

            at = first if side == "bypass" else match["bypass"].coeff
            match[side] = match_kl(kl_at, targets[side], at, c_max=c_max)
        key = f"{method}_control_{i + 1}"
        out.append(ControlDraw(key, [[int(a), int(e)] for a, e, _ in draw], position, match["bypass"], match["induce"]))
        edits.append((edits_of(draw, match["bypass"].coeff, "bypass"), edits_of(draw, match["induce"].coeff, "induce")))
    note = f"skipped (zero or non-finite direction): {', '.join(skipped)}" if skipped else ""
    if not draws:
        note = "no experts to draw from: the layer has too few experts below the threshold"
    return ExpertControl(method, rule, out, note), edits


def _experts_name(experts: Sequence[Expert]) -> str:
    return ", ".join(f"L{a} E{e}" for a, e, _ in experts)
