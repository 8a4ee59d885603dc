"""Theorem 4.4 and Corollary 4.5 of FSLoRA as plain functions of their constants (docs/method.md s. 6).

This is the one place the bound lives: the scripts, the tests and the notebook all call it.

    L_bar   = L * mean_i (r / k_i)          smoothness of f^S          (Prop. D.4)
    L_tilde = L * mean_i (r / k_i)^2        the paper's fixed-sketch constant, averaged

    gamma <= min{ 1 / (6 H sqrt((c_h + 1) L_tilde L)),  1 / (N H^2 L) }

    (1/T) sum_{t<T} E||grad f^S(X^t)||^2
        <= 4 (f^S(X^0) - f*) / (gamma T H)
         + 6 (gamma L_bar / N) (sigma_g^2 + sigma_s^2)
         + 12 (gamma L_tilde / N) (sigma_g^2 + sigma_s^2 + 3 sigma_h^2)

`sharp=True` puts L_bar where the theorem has L_tilde (in the step-size condition and in the
last term): a substitution, not derived (theory/README.md: the drift step needs mean_i L_i^2 =
L L_tilde with L_i = (r/k_i) L, and that constant is attained). The theorem derived line by line
in theory/README.md is `derived_*` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class BoundConstants:
    """The constants of assumptions (A1)-(A3) and the problem, as the theorem uses them."""

    L: float  # (A1): each f_i(X) = E l(W0 + s B A) is L-smooth in X = [B; A]
    sigma_g2: float  # (A2): data variance of a client's minibatch gradient
    sigma_s2: float  # (A2): sketch variance E_S ||grad f~_i(X; S) - grad f_i^S(X)||^2
    c_h: float  # (A3): ||grad f_i^S - grad f^S||^2 <= c_h ||grad f^S||^2 + sigma_h^2
    sigma_h2: float  # (A3)
    gap: float  # f^S(X^0) - f*
    ratios: tuple[float, ...]  # k_i / r, one per client (N = len(ratios))
    # smoothness of f^S itself, measured (max ||hess f^S|| over visited points); None: use its
    # bound L_bar (Prop. D.4). Only the derived theorem's descent step uses it.
    L_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("L", "sigma_g2", "sigma_s2", "c_h", "sigma_h2", "gap"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"BoundConstants.{name} must be >= 0, got {getattr(self, name)}")
        if self.L_s is not None and not self.L_s >= 0:
            raise ValueError(f"BoundConstants.L_s must be >= 0 or None, got {self.L_s}")
        if not self.ratios or not all(0 < q <= 1 for q in self.ratios):
            raise ValueError(f"ratios k_i/r must lie in (0, 1], got {self.ratios}")

    @property
    def N(self) -> int:
        return len(self.ratios)

    def scaled(self, **factors: float) -> "BoundConstants":
        """A copy with some constants multiplied, e.g. scaled(L=0.1): for showing checks can fail.
        L_s is measured apart from L, so scaling L leaves it alone (scale both to move both)."""
        if "L_s" in factors and self.L_s is None:
            raise ValueError("scaled(L_s=...): L_s was not measured (it is None)")
        return replace(self, **{k: getattr(self, k) * v for k, v in factors.items()})


def L_bar(c: BoundConstants) -> float:
    """L_bar = L * mean_i (r / k_i): smoothness of the sketched objective f^S (Prop. D.4)."""
    return c.L * float(np.mean([1 / q for q in c.ratios]))


def L_tilde(c: BoundConstants) -> float:
    """L_tilde = L * mean_i (r / k_i)^2: from the paper's (r/k_i)^2 L fixed-sketch constant."""
    return c.L * float(np.mean([1 / q**2 for q in c.ratios]))


def fixed_sketch_constant(c: BoundConstants, sharp: bool) -> float:
    """L_tilde as the theorem states it, or L_bar when `sharp` (a substitution; see above)."""
    return L_bar(c) if sharp else L_tilde(c)


def step_conditions(c: BoundConstants, H: int, sharp: bool = False) -> dict[str, float]:
    """Theorem 4.4's two step conditions, named (L_bar for L_tilde when `sharp`):

        gamma <= 1 / (6 H sqrt((c_h + 1) L_tilde L))   (drift into descent)
        gamma <= 1 / (N H^2 L)                          (drift terms written as gamma L_tilde / N)

    apart, so a script can run at the first alone (theory/drift.py: the second is what keeps the
    client drift under the sigma_h term)."""
    lt = fixed_sketch_constant(c, sharp)
    return {"1/(6 H sqrt((c_h+1) L_tilde L))": 1 / (6 * H * math.sqrt((c.c_h + 1) * lt * c.L)),
            "1/(N H^2 L)": 1 / (c.N * H**2 * c.L)}


def max_step(c: BoundConstants, H: int, sharp: bool = False) -> float:
    """gamma_max = min{ 1 / (6 H sqrt((c_h + 1) L_tilde L)), 1 / (N H^2 L) }  (Theorem 4.4)."""
    return min(step_conditions(c, H, sharp).values())


def bound_terms(c: BoundConstants, gamma: float, T: np.ndarray | int, H: int,
                sharp: bool = False) -> dict[str, np.ndarray]:
    """Theorem 4.4's right side split into its terms (each an array over the T given):

        gap:         4 (f^S(X^0) - f*) / (gamma T H)
        L_bar sigma_g, L_bar sigma_s:       6 (gamma L_bar / N) sigma_g^2,  ... sigma_s^2
        L_tilde sigma_g, L_tilde sigma_s:  12 (gamma L_tilde / N) sigma_g^2, ... sigma_s^2
        L_tilde sigma_h:                   12 (gamma L_tilde / N) 3 sigma_h^2

    (L_bar in place of L_tilde when `sharp`), so a reader sees which term carries the bound.
    """
    lt, lb = fixed_sketch_constant(c, sharp), L_bar(c)
    T = np.asarray(T, dtype=float)
    flat = np.ones_like(T)
    return {"gap": 4 * c.gap / (gamma * T * H),
            "L_bar sigma_g": 6 * gamma * lb / c.N * c.sigma_g2 * flat,
            "L_bar sigma_s": 6 * gamma * lb / c.N * c.sigma_s2 * flat,
            "L_tilde sigma_g": 12 * gamma * lt / c.N * c.sigma_g2 * flat,
            "L_tilde sigma_s": 12 * gamma * lt / c.N * c.sigma_s2 * flat,
            "L_tilde sigma_h": 36 * gamma * lt / c.N * c.sigma_h2 * flat}


def convergence_bound(c: BoundConstants, gamma: float, T: np.ndarray | int, H: int,
                      sharp: bool = False) -> np.ndarray:
    """Theorem 4.4's bound on (1/T) sum_{t<T} E||grad f^S(X^t)||^2: the sum of `bound_terms`."""
    return sum(bound_terms(c, gamma, T, H, sharp).values())


def fixed_sketch_smoothness(c: BoundConstants) -> np.ndarray:
    """L_i = (r / k_i) L: smoothness of f~_i(.; S) for every S, via f~_i(X; S) = f_i(P_S X) and
    ||P_S||^2 = r / k_i (README.md, 'the sharper fact'; the paper's Prop. D.4 has (r/k_i)^2 L).
    It needs (A1) at the points P_S X, up to sqrt(r / k_i) times as far out as X."""
    return c.L / np.asarray(c.ratios, dtype=float)


def sketched_smoothness(c: BoundConstants) -> float:
    """L_s: the smoothness of f^S the descent step uses: measured (c.L_s) or its bound L_bar."""
    return L_bar(c) if c.L_s is None else c.L_s


def derived_step_conditions(c: BoundConstants, H: int) -> dict[str, float]:
    """The step conditions of the theorem derived in README.md ('Theorem 4.4 derived'), each
    where its proof uses it:

        C1: gamma <= 1 / (3 H L_s),  L_s the smoothness of f^S (<= L_bar, Prop. D.4)  step (4)
        C2: gamma <= 1 / (sqrt(18) H max_i L_i),  L_i = (r / k_i) L              drift, step (6)
        C3: gamma <= sqrt(5/48) / (H sqrt((c_h + 1) L L_tilde)),
            L L_tilde = mean_i L_i^2                                                step (8)
    """
    L_max = float(fixed_sketch_smoothness(c).max())
    return {"C1 1/(3 H L_s)": 1 / (3 * H * sketched_smoothness(c)),
            "C2 1/(sqrt(18) H L_max)": 1 / (math.sqrt(18) * H * L_max),
            "C3 sqrt(5/48)/(H sqrt((c_h+1) L L_tilde))":
                math.sqrt(5 / 48) / (H * math.sqrt((c.c_h + 1) * c.L * L_tilde(c)))}


def derived_max_step(c: BoundConstants, H: int) -> float:
    """gamma_max of the derived theorem: the smallest of C1, C2, C3 (README.md, step (9))."""
    return min(derived_step_conditions(c, H).values())


def derived_bound_terms(c: BoundConstants, gamma: float, T: np.ndarray | int,
                        H: int) -> dict[str, np.ndarray]:
    """The derived theorem's right side (README.md, step (9)), term by term, over the T given:

        gap:            4 (f^S(X^0) - f*) / (gamma T H)
        L_s sigma_g:    6 gamma L_s sigma_g^2 / N
        L_s sigma_s:    6 gamma H L_s sigma_s^2 / N      (the sketch is held for H steps)
        drift sigma_g: 12/5 gamma^2 H     L L_tilde sigma_g^2
        drift sigma_s: 24/5 gamma^2 H^2   L L_tilde sigma_s^2
        drift sigma_h: 48/5 gamma^2 H^2   L L_tilde sigma_h^2

    with L L_tilde = mean_i ((r / k_i) L)^2; valid when gamma <= derived_max_step. Under
    `step_10_max_step` (C2 and Theorem 4.4's conditions, whose second, gamma <= 1 / (N H^2 L),
    gives gamma^2 H^2 L L_tilde <= gamma L_tilde / N), the drift terms are at most Theorem 4.4's
    12 (gamma L_tilde / N)(...) term.
    """
    T = np.asarray(T, dtype=float)
    flat, ls, ll = np.ones_like(T), sketched_smoothness(c), c.L * L_tilde(c)
    return {"gap": 4 * c.gap / (gamma * T * H),
            "L_s sigma_g": 6 * gamma * ls * c.sigma_g2 / c.N * flat,
            "L_s sigma_s": 6 * gamma * H * ls * c.sigma_s2 / c.N * flat,
            "drift sigma_g": 12 / 5 * gamma**2 * H * ll * c.sigma_g2 * flat,
            "drift sigma_s": 24 / 5 * gamma**2 * H**2 * ll * c.sigma_s2 * flat,
            "drift sigma_h": 48 / 5 * gamma**2 * H**2 * ll * c.sigma_h2 * flat}


def step_10_max_step(c: BoundConstants, H: int) -> float:
    """The largest step at which the derived bound is at most Theorem 4.4's (README.md, step (10)):
    min{Theorem 4.4's gamma_max, C2}. Theorem 4.4's first condition implies C3 (1/6 <
    sqrt(5/48)) and so C1; C2 it does not imply at mixed ratios."""
    return min(max_step(c, H), derived_step_conditions(c, H)["C2 1/(sqrt(18) H L_max)"])


def derived_bound(c: BoundConstants, gamma: float, T: np.ndarray | int, H: int) -> np.ndarray:
    """The derived theorem's bound on (1/T) sum_{t<T} E||grad f^S(X^t)||^2: `derived_bound_terms`
    summed."""
    return sum(derived_bound_terms(c, gamma, T, H).values())


def corollary_step(c: BoundConstants, T: int, H: int, sharp: bool = False) -> float:
    """gamma = sqrt(N / (T H L_tilde))  (Corollary 4.5): the rate becomes O(sqrt(L_tilde/(T H N)))."""
    return math.sqrt(c.N / (T * H * fixed_sketch_constant(c, sharp)))


def corollary_min_rounds(c: BoundConstants, H: int, sharp: bool = False) -> int:
    """The smallest T for which the corollary's step meets the theorem's condition."""
    return math.ceil(c.N / (H * fixed_sketch_constant(c, sharp) * max_step(c, H, sharp) ** 2))


def corollary_rate(c: BoundConstants, T: int, H: int) -> float:
    """Theorem 4.4's bound at Corollary 4.5's step gamma_T = sqrt(N / (T H L_tilde)), in closed form:

        [ 4 gap sqrt(L_tilde) + (6 L_bar (sigma_g^2 + sigma_s^2)
          + 12 L_tilde (sigma_g^2 + sigma_s^2 + 3 sigma_h^2)) / sqrt(L_tilde) ] / sqrt(T H N)

    so O(sqrt(L_tilde) / sqrt(T H N)) for fixed constants: the corollary's rate."""
    lt, noise = L_tilde(c), c.sigma_g2 + c.sigma_s2
    const = 4 * c.gap * math.sqrt(lt) + (6 * L_bar(c) * noise
                                         + 12 * lt * (noise + 3 * c.sigma_h2)) / math.sqrt(lt)
    return const / math.sqrt(T * H * c.N)
