"""The statistics of the reproduction study (fslora_min/study/compare.py): paired intervals,
verdicts, grid choice, plateau checks.

A claim of the paper is "method a reaches a lower loss than method b". Both are run on the same
evaluation seeds (each seed: its own data, partition, participants, minibatches), so the
per-seed differences d_s = L_a(s) - L_b(s) are paired; their mean with a 95% Student-t interval
says whether the data decide the claim. Only the sign of the interval's ends gives a verdict.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with df degrees of freedom (Simpson's rule on its density)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    steps = 400  # even; the density is smooth, so the error is far below the bisection's
    h = x / steps
    total = sum((1 if i in (0, steps) else 4 if i % 2 else 2)
                * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1))
    return 0.5 + c * total * h / 3


@lru_cache(maxsize=None)
def t_quantile(q: float, df: int) -> float:
    """x with t_cdf(x, df) = q, by bisection (q in (0, 1))."""
    if not 0 < q < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    lo, hi = -1e3, 1e3
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Paired:
    """Mean of the paired differences with its 95% t-interval (n >= 2 seeds)."""

    n: int
    mean: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_interval(diffs: list[float], level: float = 0.95) -> Paired:
    """mean(d) +- t_{(1+level)/2, n-1} sd(d) / sqrt(n): the interval for E[L_a - L_b]."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {n}")
    if not all(math.isfinite(d) for d in diffs):
        return Paired(n, math.nan, math.nan, math.nan)
    mean = statistics.fmean(diffs)
    half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half)


def verdict(p: Paired) -> str:
    """The paper says a < b (difference < 0): reproduced if the whole interval is below 0, not
    reproduced if the whole interval is above 0, inconclusive otherwise (or with a diverged run)."""
    if p.high < 0:
        return REPRODUCED
    if p.low > 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def diverged(curve: list[float]) -> bool:
    """A run diverged if its loss is not finite or ends above where it started."""
    return not all(math.isfinite(x) for x in curve) or curve[-1] > curve[0]


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
