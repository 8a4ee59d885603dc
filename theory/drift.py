"""Client drift on heterogeneous quadratics: where the sigma_h and c_h terms and the steps bind.

On the least-squares runs (convergence.py, noise.py, derived.py) every heterogeneity term is
orders of magnitude above what it bounds, so a wrong constant in it passes every measured
check. Both proofs use only (A1)-(A3) of the f_i as functions of X, so the smallest problem
that meets them exactly can put those terms in play: N clients with

    f_i(x) = a_i (x - b_i)^2 / 2,   x in R,   every k_i = r (S = I: FSLoRA is FedAvg, sigma_s = 0),

full-batch local steps (sigma_g = 0). Some a_i < 0: those clients are nonconvex (LoRA losses
are too), their mean f is not. Everything is exact: L = max_i |a_i|, L_s = mean_i a_i,
f* = min f, and at every visited x each h_i = ||grad f_i - grad f||^2 and ||grad f||^2. (A3)
holds for every pair (c_h, sigma_h^2) with h_i <= c_h ||grad f||^2 + sigma_h^2 at the visited
points, so the theorems must hold for each; each regime takes the pair that isolates its term.

1. sigma_h, client drift (`SIGMA_H`): (a_i, b_i) alternate (1, 1), (-1/2, -1), N = 4,
   H = 1000, X^0 = the fixed point x_hat of a round (`round_fixed_point`): every round repeats,
   so the observed average is ||grad f(x_hat)||^2 and the gap term fades with T; c_h = 0. To
   second order in gamma H (`drift_bias`), grad f(x_hat) is (gamma (H-1)/2) mean_i a_i h_i:
   squared, up to (gamma H)^2 L^2 sigma_h^2 / 4, while Theorem 4.4's sigma_h term is
   36 gamma L_tilde sigma_h^2 / N. Their ratio grows like gamma H^2 L N: the second condition,
   gamma <= 1/(N H^2 L), is what keeps it below 1/144. At the first condition alone (what
   1/(N H L) in place of 1/(N H^2 L) leaves when N <= 6) the bound FAILS. The derived theorem's
   term, 48/5 gamma^2 H^2 L L_tilde sigma_h^2, has the drift's (gamma H)^2 and stays far above.
2. c_h and C3 (`C_H`): one minimiser (b_i = 0), (a_1, a_2) = (1, -0.6), so sigma_h = 0 and
   c_h = max_i (a_i - abar)^2 / abar^2 = 16 at every x; a round contracts x by
   mean_i (1 - gamma a_i)^H ~ 1 - gamma H abar + gamma^2 H (H-1) mean_i a_i^2 / 2: the drift
   slows the descent, which C3 caps. From x = 1 with H = 10 the derived theorem (C3 binds) runs
   at its step and at multiples of it, to show how far a looser C3 stays unseen.

    python -m theory.drift [--quick]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from theory import bound  # by module: the tests' monkeypatched formulas reach every call
from theory.bound import BoundConstants
from theory.calibration import Outcome
from theory.constants import Raw, heterogeneity_bound
from theory.convergence import outcome_checks
from theory.derived import derived_checks
from theory.noise import term_table
from theory.report import Check, exit_code, print_checks, script_parser


@dataclass(frozen=True)
class Clients:
    """f_i(x) = a_i (x - b_i)^2 / 2 on x in R, f = mean_i f_i; (A1) with L = max_i |a_i|."""

    a: tuple[float, ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.a) != len(self.b) or not np.mean(self.a) > 0:
            raise ValueError(f"Clients needs one b_i per a_i and mean_i a_i > 0 (f bounded "
                             f"below), got a={self.a}, b={self.b}")

    def grads(self, x: np.ndarray) -> np.ndarray:
        """grad f_i(x) = a_i (x - b_i): (K,) -> (K, N)."""
        return np.asarray(self.a) * (np.asarray(x, float)[..., None] - np.asarray(self.b))

    def loss(self, x: float) -> float:
        """f(x) = mean_i a_i (x - b_i)^2 / 2."""
        return float(np.mean(np.asarray(self.a) * (x - np.asarray(self.b)) ** 2) / 2)

    def minimum(self) -> float:
        """f* = f(x*), x* = mean_i a_i b_i / mean_i a_i."""
        a, b = np.asarray(self.a), np.asarray(self.b)
        return self.loss(float((a * b).mean() / a.mean()))


SIGMA_H = Clients(a=(1.0, -0.5) * 2, b=(1.0, -1.0) * 2)
C_H = Clients(a=(1.0, -0.6), b=(0.0, 0.0))


def fedavg_round(cl: Clients, x: float, gamma: float, H: int) -> float:
    """One round (FSLoRA at k_i = r): every client takes H full-batch steps
    x_i <- x_i - gamma a_i (x_i - b_i) from x, and the server averages the x_i."""
    a, b = np.asarray(cl.a), np.asarray(cl.b)
    xs = np.full(len(a), x)
    for _ in range(H):
        xs = xs - gamma * a * (xs - b)
    return float(xs.mean())


def round_fixed_point(cl: Clients, gamma: float, H: int) -> float:
    """x_hat with fedavg_round(x_hat) = x_hat: a client maps x to b_i + rho_i (x - b_i),
    rho_i = (1 - gamma a_i)^H, so x_hat = sum_i (1 - rho_i) b_i / sum_i (1 - rho_i)."""
    a, b = np.asarray(cl.a), np.asarray(cl.b)
    rho = (1 - gamma * a) ** H
    return float(((1 - rho) * b).sum() / (1 - rho).sum())


def drift_bias(cl: Clients, x: float, gamma: float, H: int) -> float:
    """The second-order prediction of grad f at a round's fixed point, from
    sum_i (1 - rho_i)(x - b_i) = 0 with 1 - rho_i ~ gamma H a_i - gamma^2 H (H-1) a_i^2 / 2:

        grad f(x_hat) (1 - gamma (H-1) abar / 2) = (gamma (H-1) / 2) mean_i a_i h_i(x_hat)."""
    g = cl.grads(x)
    h = g - g.mean()
    abar = float(np.mean(cl.a))
    return float((gamma * (H - 1) / 2) * np.mean(np.asarray(cl.a) * h)
                 / (1 - gamma * (H - 1) * abar / 2))


def play_rounds(cl: Clients, x0: float, gamma: float, H: int, rounds: int) -> np.ndarray:
    """The global iterates X^0 ... X^{T-1} of `rounds` rounds from x0."""
    xs = [x0]
    for _ in range(rounds - 1):
        xs.append(fedavg_round(cl, xs[-1], gamma, H))
    return np.array(xs)


def measured(cl: Clients, points: np.ndarray, c_h: float | None) -> BoundConstants:
    """(A1)-(A3) and the gap, exact over the visited points (X^0 = points[0]). c_h: the (A3)
    pair's c_h (sigma_h^2 then the smallest that holds); None: the smallest c_h with
    sigma_h^2 = 0, max over the points of h_i / ||grad f||^2."""
    g = cl.grads(points)  # (T, N)
    full = g.mean(-1)
    raw = Raw(L=float(np.abs(cl.a).max()), sigma_g2=0.0, sigma_s2=0.0,
              het=(g - full[:, None]) ** 2, grad_sq=full**2, f_star=cl.minimum(),
              f0=cl.loss(points[0]), L_s=float(np.mean(cl.a)))
    if c_h is None:
        c_h = float((raw.het / raw.grad_sq[:, None]).max())
    return BoundConstants(raw.L, 0.0, 0.0, c_h, heterogeneity_bound(raw, c_h), raw.f0 - raw.f_star,
                          (1.0,) * len(cl.a), raw.L_s)


def outcome(cl: Clients, x0: float | None, gamma: float, H: int, rounds: int,
            c_h: float | None) -> Outcome:
    """Run from x0 (None: the round's fixed point at this gamma) and measure: the observed
    (1/T) sum_{t<T} ||grad f(X^t)||^2 for every T, and the constants over the iterates (kept
    as floats in `Outcome.points`; no records: the checks read only the rest)."""
    x0 = round_fixed_point(cl, gamma, H) if x0 is None else x0
    points = play_rounds(cl, x0, gamma, H, rounds)
    grad_sq = cl.grads(points).mean(-1) ** 2
    observed = np.cumsum(grad_sq) / np.arange(1, rounds + 1)
    return Outcome(measured(cl, points, c_h), cl.minimum(), gamma, observed, [], list(points))


def structure(cl: Clients, c_h: float) -> BoundConstants:
    """The constants the step rules read (L, L_s, c_h, N); the step does not depend on the
    others, so it is known before the run that measures them."""
    return BoundConstants(float(np.abs(cl.a).max()), 0.0, 0.0, c_h, 0.0, 0.0,
                          (1.0,) * len(cl.a), float(np.mean(cl.a)))


def tightest(out: Outcome, H: int) -> float:
    """max over T of observed / the derived bound (here, with sigma_g = sigma_s = sigma_h = 0,
    its gap term alone, as Theorem 4.4's is)."""
    T = np.arange(1, len(out.observed) + 1)
    return float((out.observed / bound.derived_bound(out.constants, out.step, T, H)).max())


def sigma_h_regime(H: int, rounds: int) -> tuple[list[Check], list[str]]:
    """Theorem 4.4 and the derived theorem at their own steps from the fixed point, and
    Theorem 4.4 at its first condition alone: the drift against each sigma_h term."""
    shape = structure(SIGMA_H, 0.0)
    thm = outcome(SIGMA_H, None, bound.max_step(shape, H), H, rounds, 0.0)
    der = outcome(SIGMA_H, None, bound.derived_max_step(shape, H), H, rounds, 0.0)
    first = bound.step_conditions(shape, H)["1/(6 H sqrt((c_h+1) L_tilde L))"]
    probe = outcome(SIGMA_H, None, first, H, rounds, 0.0)
    lines = []
    for label, out in (("Theorem 4.4's step", thm), ("the derived step", der),
                       ("the first condition alone", probe)):
        x = out.points[0]
        lines.append(f"at {label}: gamma H L = {out.step * H * out.constants.L:.4g}; "
                     f"grad f(x_hat) = {float(SIGMA_H.grads(x).mean()):.4g} (second order: "
                     f"{drift_bias(SIGMA_H, x, out.step, H):.4g}), sigma_h^2 = "
                     f"{out.constants.sigma_h2:.4g}")
    lines += term_table("sigma_h: Theorem 4.4 at its step", thm, H)
    lines += term_table("sigma_h: the derived theorem at its step", der, H,
                        bound.derived_bound_terms)
    lines += term_table("sigma_h: Theorem 4.4 at its first condition alone (not a check)",
                        probe, H)
    terms = bound.derived_bound_terms(der.constants, der.step, rounds, H)
    tenth = float(sum(terms.values()) - 0.9 * terms["drift sigma_h"])
    lines.append(f"  the derived bound with its sigma_h drift term / 10: {tenth:.4g}, observed / "
                 f"it {der.observed[-1] / tenth:.3g} (below 1: that wrong constant passes here)")
    checks = outcome_checks("sigma_h, Thm 4.4", thm, H, {})[:2]  # k = r: L_bar = L_tilde
    checks += derived_checks("sigma_h, derived", der, H, {})
    return checks, lines


MULTIPLES = (1, 2, 4, 6, 7, 8)  # of the derived step, in the c_h regime


def c_h_regime(H: int, rounds: int) -> tuple[list[Check], list[str]]:
    """The derived theorem at its step (C3 binds) and at multiples of it, from x = 1."""
    shape = structure(C_H, measured(C_H, np.array([1.0]), None).c_h)
    step = bound.derived_max_step(shape, H)
    outs = {m: outcome(C_H, 1.0, m * step, H, rounds, None) for m in MULTIPLES}
    conditions = bound.derived_step_conditions(shape, H)
    lines = [f"c_h = {shape.c_h:.4g}; step conditions at H = {H}: " + ", ".join(
        f"{k.split()[0]} {v:.4g}" for k, v in conditions.items())]
    lines += term_table("c_h: the derived theorem at its step", outs[1], H,
                        bound.derived_bound_terms)
    lines += [f"  {m} x the derived step (gamma = {o.step:.4g}): observed / derived bound "
              f"{tightest(o, H):.3g} at the tightest T" for m, o in outs.items()]
    c2, c3 = (conditions[k] for k in ("C2 1/(sqrt(18) H L_max)",
                                      "C3 sqrt(5/48)/(H sqrt((c_h+1) L L_tilde))"))
    lines.append(f"  (C3 with sqrt(5/12) is the 2 x row: C2 is {c2 / c3:.3g} x C3 "
                 f"here, so a step past C2 starts above that)")
    return derived_checks("c_h, derived", outs[1], H, {}), lines


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    args = parser.parse_args(argv)
    H, rounds = 1000, (200 if args.quick else 2000)
    print(f"deterministic (no randomness: --seed {args.seed} changes nothing); float64; "
          f"sigma_h regime: a = {SIGMA_H.a}, b = {SIGMA_H.b}, H = {H}, T = {rounds}; c_h regime: "
          f"a = {C_H.a}, b = {C_H.b}, H = 10, T = {rounds}")
    checks, lines = sigma_h_regime(H, rounds)
    more, more_lines = c_h_regime(10, rounds)
    print("\n" + "\n".join(lines + more_lines))
    print_checks("client drift: the sigma_h and c_h terms where they bind", checks + more)
    return exit_code(checks + more)


if __name__ == "__main__":
    raise SystemExit(main())
