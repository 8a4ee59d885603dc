"""The statistics of the reproduction study (fslora_min/study/compare.py): the t distribution,
paired intervals and p-values, Holm's correction, verdicts, divergence, grid choice, plateau
checks.

A claim of the paper is "method a reaches a lower loss than method b". Both are run on the same
evaluation seeds (each seed: its own data, partition, participants, minibatches), so the
per-seed differences d_s = L_a(s) - L_b(s) are paired; their mean with a 95% Student-t interval
says whether the data decide the claim. A task's many claim x horizon cells are one family:
Holm's adjusted p-values decide it, so that the chance of any false decision stays <= 5%.
Only the sign of the mean of a decided cell says which way it went. The t distribution is
computed from the regularized incomplete beta function (a continued fraction), right to ~1e-11
relative far into both tails.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def incomplete_beta(a: float, b: float, x: float, y: float | None = None) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b), the regularized incomplete beta function.

    x^a y^b / (a B(a, b)) / (1 + d_1 / (1 + d_2 / (1 + ...))), with y = 1 - x,
    d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),
    d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)): the continued fraction (evaluated by
    Lentz's method) converges fast for x < (a + 1) / (a + b + 2); above that,
    I_x(a, b) = 1 - I_y(b, a). Pass y when 1 - x would lose digits (x near 1).
    """
    y = 1.0 - x if y is None else y
    if not (0 <= x <= 1 and 0 <= y <= 1 and a > 0 and b > 0):
        raise ValueError(f"need a, b > 0 and 0 <= x = 1 - y <= 1, got {a}, {b}, {x}, {y}")
    if x == 0 or y == 0:
        return 0.0 if x == 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(b, a, y, x)
    tiny = 1e-300
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(y)) / a
    f, c, d = 1.0, 1.0, 0.0  # the modified Lentz recurrence on 1 + d_1 / (1 + ...)
    for i in range(1, 100_000):
        m = i // 2
        if i % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            return front / f
    raise ArithmeticError(f"the continued fraction of I_{x}({a}, {b}) did not converge")


def t_sf(x: float, df: float) -> float:
    """P(T > x) for Student's t with df degrees of freedom, accurate far into both tails:
    P(T > x) = I_{df / (df + x^2)}(df / 2, 1 / 2) / 2 for x >= 0, and 1 - P(T > -x) below."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isnan(x):
        return math.nan
    if x < 0:
        return 1.0 - t_sf(-x, df)
    if math.isinf(x):
        return 0.0
    return 0.5 * incomplete_beta(df / 2, 0.5, df / (df + x * x), x * x / (df + x * x))


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) = 1 - P(T > x) (t_sf)."""
    return 1.0 - t_sf(x, df) if x >= 0 else t_sf(-x, df)


@lru_cache(maxsize=None)
def t_quantile(q: float, df: float) -> float:
    """x with P(T <= x) = q, q in (0, 1): bisection on the upper tail P(T > x) = 1 - q (the
    lower tail by symmetry, x(q) = -x(1 - q)), after doubling a bracket until it holds x, so no
    q near 0 or 1 runs into a fixed bracket's end."""
    if not 0 < q < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    tail, lo, hi = 1.0 - q, 0.0, 1.0
    while t_sf(hi, df) > tail:
        lo, hi = hi, 2 * hi
    while hi - lo > 4 * math.ulp(hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf(mid, df) > tail else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Paired:
    """Mean of the paired differences with its 95% t-interval (n >= 2 seeds) and the two-sided
    p-value of "mean 0" (NaN where a difference is not finite)."""

    n: int
    mean: float
    low: float
    high: float
    p: float = math.nan

    def text(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_interval(diffs: list[float], level: float = 0.95) -> Paired:
    """mean(d) +- t_{(1+level)/2, n-1} sd(d) / sqrt(n): the interval for E[L_a - L_b]."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {n}")
    if not all(math.isfinite(d) for d in diffs):
        return Paired(n, math.nan, math.nan, math.nan)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half, paired_p_value(mean, sd, n))


def paired_p_value(mean: float, sd: float, n: int) -> float:
    """p = 2 P(T_{n-1} > |mean| sqrt(n) / sd): the two-sided paired t-test of E[d] = 0 (0 when
    every difference is the same non-zero number, 1 when all are 0). p < 1 - level exactly
    when the level's interval excludes 0."""
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return min(1.0, 2 * t_sf(abs(mean) * math.sqrt(n) / sd, n - 1))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: with p_(1) <= ... <= p_(m),
    p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting where p~ <= alpha keeps the
    chance of any false rejection in the family at most alpha, whatever the dependence."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(p: Paired, adjusted: float | None = None, alpha: float = 0.05) -> str:
    """The paper says a < b (difference < 0): reproduced if the whole interval is below 0, not
    reproduced if the whole interval is above 0, inconclusive otherwise (or with a non-finite
    difference). With `adjusted` (e.g. Holm's p~), decided only where adjusted <= alpha, the
    sign of the mean saying which way."""
    if adjusted is not None:
        decided = adjusted <= alpha and math.isfinite(p.mean)
        return INCONCLUSIVE if not decided else REPRODUCED if p.mean < 0 else NOT_REPRODUCED
    if p.high < 0:
        return REPRODUCED
    if p.low > 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def diverged(curve: list[float]) -> bool:
    """A run diverged if its loss is not finite or ends above where it started."""
    return not all(math.isfinite(x) for x in curve) or curve[-1] > curve[0]


def diverged_seeds(curves: list[list[float]], horizon: int) -> int:
    """How many of a row's evaluation runs diverged by round `horizon` (loss non-finite up to
    it, or above the initial loss at it). A comparison with such a row decides nothing: a
    diverged row neither loses to nor ties with the other."""
    return sum(diverged(c[:horizon + 1]) for c in curves)


@dataclass(frozen=True)
class Choice:
    """The best grid point and the grid edges it lies on (empty: an interior point)."""

    point: tuple[float, float] | None  # (client lr, server step); None if every point diverged
    edges: tuple[str, ...]


def choose(scores: dict[tuple[float, float], float], lrs: list[float],
           steps: list[float]) -> Choice:
    """Lowest finite score; a point that diverged on any tuning seed has score inf, never chosen.

    An axis with one value has no edge (the step is then fixed by the condition, not tuned).
    """
    finite = {p: s for p, s in scores.items() if math.isfinite(s)}
    if not finite:
        return Choice(None, ())
    lr, step = min(finite, key=finite.get)
    edges = []
    for name, value, axis in (("lr", lr, lrs), ("server step", step, steps)):
        if len(axis) > 1 and value == min(axis):
            edges.append(f"lowest {name}")
        if len(axis) > 1 and value == max(axis):
            edges.append(f"highest {name}")
    return Choice((lr, step), tuple(edges))


def widen(axis: list[float], edges: tuple[str, ...], name: str, factor: float) -> list[float]:
    """The axis with one more value past each edge of `name` that the choice lies on."""
    out = list(axis)
    if f"lowest {name}" in edges:
        out.insert(0, min(axis) / factor)
    if f"highest {name}" in edges:
        out.append(max(axis) * factor)
    return out


def plateau(curve: list[float], window: float = 0.1, tolerance: float = 0.005) -> bool:
    """True if the mean loss of the last `window` of rounds is within `tolerance` (relative) of
    the window before it: the run has stopped improving at this horizon."""
    w = max(1, int(len(curve) * window))
    if len(curve) < 2 * w + 1:
        return False
    last, before = statistics.fmean(curve[-w:]), statistics.fmean(curve[-2 * w:-w])
    return before - last <= tolerance * abs(before)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the tie-averaged ranks."""
    return float(np.corrcoef(average_ranks(np.asarray(x)), average_ranks(np.asarray(y)))[0, 1])
