"""Uncertainty for the study's rates: bootstrap intervals and an exact paired test (no scipy needed).

Example:
    >>> from expertlens.refusal.stats import bootstrap_interval, mcnemar_exact
    >>> lo, hi = bootstrap_interval(50, 100)
    >>> 0.39 < lo < 0.42 and 0.58 < hi < 0.61
    True
    >>> round(mcnemar_exact(8, 1), 4)
    0.0391
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bootstrap_interval", "mcnemar_exact", "N_BOOT", "LEVEL"]

#: Bootstrap resamples per interval and the interval's coverage.
N_BOOT = 2000
LEVEL = 0.95


def bootstrap_interval(
    k: int, n: int, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a rate ``k / n`` (resampling the ``n`` outcomes with replacement).

    Resampling ``n`` Bernoulli outcomes with ``k`` successes is a binomial draw ``Binomial(n, k/n)``, which is
    what is drawn here (same distribution, O(n_boot) work). Deterministic for a given ``seed`` (a local
    generator; the global RNGs are untouched). ``n = 0`` gives ``(nan, nan)``.

    Example:
        >>> from expertlens.refusal.stats import bootstrap_interval
        >>> bootstrap_interval(0, 20)   # every outcome the same: no spread
        (0.0, 0.0)
    """
    if not isinstance(k, (int, np.integer)) or not isinstance(n, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"bootstrap_interval needs integers 0 <= k <= n, got k={k!r}, n={n!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.binomial(int(n), k / n, size=int(n_boot)) / n
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes.

    ``b``: pairs where only the first condition succeeds; ``c``: only the second. Under the null each
    discordant pair goes either way with probability 1/2, so ``p = min(1, 2·P(X ≤ min(b, c)))`` with
    ``X ~ Binomial(b + c, 1/2)``; no discordant pairs gives ``p = 1``.

    Example:
        >>> from expertlens.refusal.stats import mcnemar_exact
        >>> mcnemar_exact(0, 0), mcnemar_exact(5, 5)
        (1.0, 1.0)
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
