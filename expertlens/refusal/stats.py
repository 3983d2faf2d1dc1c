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

__all__ = ["bootstrap_interval", "mcnemar_exact", "paired_margin", "ratio_interval", "N_BOOT", "N_PERM", "LEVEL"]

#: Bootstrap resamples per interval and the interval's coverage.
N_BOOT = 2000
LEVEL = 0.95
#: Sign flips of the permutation test against several control draws.
N_PERM = 10000


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


def paired_margin(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[float, float, float, float]:
    """``(margin, lo, hi, p)``: mean of ``a`` minus the mean of ``b`` over the same prompts, B possibly several draws.

    ``a`` is one 0/1 outcome per prompt ``[n]``; ``b`` is ``[m, n]``, one row per control draw (``m = 1``: one
    condition). The margin is ``mean(a) − mean(b)``. Its interval is a percentile bootstrap that resamples the draws
    and, paired, the prompts (so it widens when the draws disagree as well as when there are few prompts). The test:
    for one draw the exact McNemar test; for several, a two-sided sign-flip permutation test on the per-prompt
    differences ``a_i − mean_j b_ji`` (``N_PERM`` flips, seeded). Deterministic for a given ``seed``.

    Example:
        >>> import numpy as np
        >>> from expertlens.refusal.stats import paired_margin
        >>> a = np.array([1] * 9 + [0]); b = np.zeros((1, 10))
        >>> m, lo, hi, p = paired_margin(a, b)
        >>> m, round(p, 4), lo > 0
        (0.9, 0.0039, True)
    """
    a = np.asarray(a, dtype=float)
    b = np.atleast_2d(np.asarray(b, dtype=float))
    m, n = b.shape
    if a.shape != (n,) or m == 0 or n == 0:
        raise ValueError(f"paired_margin needs a [n] and b [m, n] with m, n > 0; got {a.shape} and {b.shape}")
    value = float(a.mean() - b.mean())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, m, size=(n_boot, m))
    prompts = rng.integers(0, n, size=(n_boot, n))
    picked = np.take_along_axis(b[draws], prompts[:, None, :], axis=2)  # [n_boot, m, n]
    boot = a[prompts].mean(1) - picked.mean((1, 2))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    if m == 1:
        p = mcnemar_exact(int(((a == 1) & (b[0] == 0)).sum()), int(((a == 0) & (b[0] == 1)).sum()))
    else:
        d = a - b.mean(0)
        signs = rng.integers(0, 2, size=(N_PERM, n), dtype=np.int8) * 2.0 - 1.0
        p = float((1 + (np.abs(signs @ d) >= abs(d.sum()) - 1e-12).sum()) / (N_PERM + 1))
    return value, float(lo), float(hi), float(p)


def ratio_interval(
    num: np.ndarray, den: np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(num) / mean(den)`` over paired per-prompt values.

    Used for a pathway's share of the full ablation's drop (per prompt: the pathway's drop in refusal score over
    the full ablation's). A resample whose denominator is 0 counts as NaN and is left out.

    Example:
        >>> import numpy as np
        >>> from expertlens.refusal.stats import ratio_interval
        >>> lo, hi = ratio_interval(np.full(20, 1.0), np.full(20, 2.0))
        >>> lo, hi
        (0.5, 0.5)
    """
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError(f"ratio_interval needs two non-empty [n] arrays; got {num.shape} and {den.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(n_boot, num.size))
    d = den[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(np.abs(d) > 1e-12, num[idx].mean(1) / d, np.nan)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(r, [alpha, 1 - alpha])
    return float(lo), float(hi)
