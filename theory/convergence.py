"""Theorem 4.4 and Corollary 4.5 checked on the least-squares LoRA problem (FSLORA.md section 5).

For each setting (sketching ratio k/r, local steps H, clients N) we measure the constants over
the region the runs visit, run FSLoRA at the theorem's largest allowed step gamma_max
(theory/calibration.py), and compare, for every T, the observed (1/T) sum_t ||grad f^S(X^t)||^2
(exact gradients, averaged over seeds) with the bound (theory/bound.py), and with the sharper
bound that has L_bar in place of L_tilde. Then the corollary: gamma = sqrt(N / (T H L_tilde))
for several T past the smallest T it allows, and the log-log slope of the observed rate against
1 / sqrt(T H N) (the bound's slope is 1). How each constant is measured: theory/constants.py.

    python -m theory.convergence [--quick] [--distort L=0.01 --distort gap=0.01 (must FAIL)]
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from theory.bound import (L_bar, L_tilde, convergence_bound, corollary_min_rounds,  # noqa: E402
                          corollary_step, max_step)
from theory.calibration import Effort, Outcome, calibrate, measured_constants, run_seeds  # noqa
from theory.lsq_problem import LSQConfig, LSQProblem  # noqa: E402
from theory.report import (Check, exit_code, loglog_slope, script_parser,  # noqa: E402
                           print_checks, save_figure, setup)


def parse_distort(items: list[str]) -> dict[str, float]:
    """--distort NAME=FACTOR items -> {NAME: FACTOR}; a bad item is an error naming the flag."""
    fields = ("L", "sigma_g2", "sigma_s2", "c_h", "sigma_h2", "gap")
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            out[name] = None
        if name not in fields or out[name] is None:
            raise SystemExit(f"--distort {item!r}: expected NAME=FACTOR with NAME one of {fields}")
    return out


def bound_curves(out: Outcome, H: int, distort: dict) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 4.4's bound for T = 1..len(observed), with L_tilde and with L_bar."""
    c = out.constants.scaled(**distort)
    T = np.arange(1, len(out.observed) + 1)
    return convergence_bound(c, out.step, T, H), convergence_bound(c, out.step, T, H, sharp=True)


def outcome_checks(label: str, out: Outcome, H: int, distort: dict) -> list[Check]:
    """The step condition, and observed <= bound at every T (the row shows the tightest T)."""
    c = out.constants.scaled(**distort)
    checks = [Check(f"{label}: gamma <= gamma_max", out.step, max_step(c, H), rtol=1e-12)]
    for name, bound in zip(("bound (L_tilde)", "bound (L_bar)"), bound_curves(out, H, distort)):
        t = int(np.argmax(out.observed / bound))
        checks.append(Check(f"{label}: avg ||grad f^S||^2 <= {name}", out.observed[t], bound[t],
                            note=f"tightest at T={t + 1}; at T={len(bound)}: "
                                 f"ratio {out.observed[-1] / bound[-1]:.3g}"))
    return checks


def print_constants(rows: list[tuple[str, Outcome, int]]) -> None:
    print(f"\n{'setting':<16}{'gamma':>10}{'L':>8}{'L_bar':>8}{'L_tilde':>9}{'sig_g^2':>9}"
          f"{'sig_s^2':>9}{'c_h':>6}{'sig_h^2':>9}{'gap':>8}")
    for label, out, _ in rows:
        c = out.constants
        print(f"{label:<16}{out.step:10.3g}{c.L:8.3g}{L_bar(c):8.3g}{L_tilde(c):9.3g}"
              f"{c.sigma_g2:9.3g}{c.sigma_s2:9.3g}{c.c_h:6.3g}{c.sigma_h2:9.3g}{c.gap:8.3g}")


def ordering_check(rows: list[tuple[str, Outcome, int]], distort: dict) -> Check:
    """Across ratios: pairs ordered the same way by the bound and by the observed value at T."""
    final = [(bound_curves(o, H, distort)[0][-1], o.observed[-1]) for _, o, H in rows]
    pairs = [(a, b) for i, a in enumerate(final) for b in final[i + 1:]]
    agree = sum((a[0] - b[0]) * (a[1] - b[1]) > 0 for a, b in pairs)
    order = lambda v: " > ".join(rows[i][0].split()[-1] for i in np.argsort(v)[::-1])
    print(f"\nordering at final T, largest first: bound {order([f[0] for f in final])}; "
          f"observed {order([f[1] for f in final])}")
    return Check("ratio sweep: pairs ordered as the bound predicts", agree, len(pairs), ">=")


def corollary(problem: LSQProblem, base: Outcome, H: int, rounds: list[int], effort: Effort,
              g, distort: dict) -> tuple[list[Check], dict]:
    """Runs at gamma_T = sqrt(N / (T H L_tilde)) for each T (all past the smallest T allowed, so
    the condition holds); the constants are measured again over every point these runs visit."""
    steps = [corollary_step(base.constants, T, H) for T in rounds]
    outs = [run_seeds(problem, T, H, s, effort, f"corollary T={T}") for T, s in zip(rounds, steps)]
    points = base.points + [x for recs in outs for rec in recs for x in rec.points]
    c = measured_constants(problem, points, base.f_star, effort, g).scaled(**distort)
    observed = np.array([np.mean([rec.running_average()[-1] for rec in recs]) for recs in outs])
    bound = np.array([convergence_bound(c, s, T, H) for T, s in zip(rounds, steps)])
    x = 1 / np.sqrt(np.array(rounds) * H * c.N)
    checks = [Check(f"corollary T={T}: gamma_T <= gamma_max", s, max_step(c, H), rtol=1e-12)
              for T, s in zip(rounds, steps)]
    checks += [Check(f"corollary T={T}: avg ||grad f^S||^2 <= bound", o, b)
               for T, o, b in zip(rounds, observed, bound)]
    slope_obs, slope_bound = loglog_slope(x, observed), loglog_slope(x, bound)
    checks.append(Check("corollary: slope of bound vs 1/sqrt(THN)", slope_bound, 1.0, "==",
                        rtol=1e-9))
    checks.append(Check("corollary: slope of observed vs 1/sqrt(THN)", slope_obs, 1.0, ">=",
                        rtol=0.25, note="at least as fast as the rate"))
    return checks, {"x": x, "observed": observed, "bound": bound, "slope": slope_obs,
                    "min_rounds": corollary_min_rounds(base.constants, H)}


def plot_curves(ax, rows: list[tuple[str, Outcome, int]], distort: dict, title: str) -> None:
    """Observed (solid) against the bound with L_tilde (dashed) and L_bar (dotted), per setting."""
    for i, (label, out, H) in enumerate(rows):
        T = np.arange(1, len(out.observed) + 1)
        bound, sharp = bound_curves(out, H, distort)
        ax.loglog(T, out.observed, "-", color=f"C{i}", label=f"{label}: observed")
        ax.loglog(T, bound, "--", color=f"C{i}", label="bound, L_tilde")
        ax.loglog(T, sharp, ":", color=f"C{i}", label="bound, L_bar")
    ax.set(xlabel="rounds T", ylabel="(1/T) sum_t ||grad f^S(X^t)||^2", title=title)
    ax.legend(fontsize=7, ncol=1)


def plot_all(ratios, Hs, Ns, rate, distort: dict, folder: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    plot_curves(ax, ratios, distort, "FSLoRA at gamma_max: bound against observed, per ratio")
    save_figure(fig, folder, "convergence_ratios.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_curves(axes[0], Hs, distort, "local steps H (k/r = 1/2)")
    plot_curves(axes[1], Ns, distort, "clients N (k/r = 1/2)")
    save_figure(fig, folder, "convergence_sweeps.png")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(rate["x"], rate["bound"], "s--", label="bound (slope 1)")
    ax.loglog(rate["x"], rate["observed"], "o-", label=f"observed (slope {rate['slope']:.2f})")
    ax.set(xlabel="1 / sqrt(T H N)", ylabel="(1/T) sum_t ||grad f^S(X^t)||^2",
           title=f"Corollary 4.5: gamma = sqrt(N/(T H L_tilde)), T >= {rate['min_rounds']}")
    ax.legend()
    save_figure(fig, folder, "convergence_rate.png")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=2000, help="T of the sweeps")
    parser.add_argument("--distort", action="append", default=[], metavar="NAME=FACTOR",
                        help="multiply a measured constant by FACTOR in the bound, e.g. L=0.01 "
                             "(with gap=0.01 the checks must FAIL); repeatable")
    args = parser.parse_args(argv)
    args.distort = parse_distort(args.distort)
    effort = Effort()
    ks, Hs, Ns, r = (1, 2, 4, 6, 8), (1, 2, 4), (2, 4, 8), 8
    if args.quick:
        args.rounds, ks, Hs, Ns = 120, (2, 4, 8), (1, 2), (2, 4)
        effort = Effort(seeds=1, gd_steps=300, power_iters=30, keep_points=6)
    g = setup(args.seed)
    print(f"seed {args.seed}; float64; least squares m=n={LSQConfig.m}, r={r}; T={args.rounds}; "
          f"{effort}")

    def setting(k: int, H: int, N: int, label: str):
        problem = LSQProblem(LSQConfig(r=r, ranks=(k,) * N, seed=args.seed))
        return label, calibrate(problem, args.rounds, H, effort, g, label), H

    base = setting(4, 2, 4, "N=4 H=2 k/r=4/8")
    by_ratio = [setting(k, 2, 4, f"N=4 H=2 k/r={k}/{r}") if k != 4 else base for k in ks]
    by_H = [setting(4, H, 4, f"N=4 H={H} k/r=4/8") if H != 2 else base for H in Hs]
    by_N = [setting(4, 2, N, f"N={N} H=2 k/r=4/8") if N != 4 else base for N in Ns]
    rows = list(dict((label, (label, o, H)) for label, o, H in by_ratio + by_H + by_N).values())
    print_constants(rows)
    checks = [c for label, out, H in rows for c in outcome_checks(label, out, H, args.distort)]
    checks.append(ordering_check(by_ratio, args.distort))
    T0 = corollary_min_rounds(base[1].constants, 2)
    T1 = round(1.25 * T0)  # slack: the constants are measured again over the new runs' points
    rounds = [T1, 2 * T1] if args.quick else [T1, 2 * T1, 4 * T1, 8 * T1]
    problem = LSQProblem(LSQConfig(r=r, ranks=(4,) * 4, seed=args.seed))
    cor_checks, rate = corollary(problem, base[1], 2, rounds, effort, g, args.distort)
    print_checks("Theorem 4.4: observed against the bound", checks)
    print_checks(f"Corollary 4.5 (N=4 H=2 k/r=1/2; smallest T allowed: {T0})", cor_checks)
    plot_all(by_ratio, by_H, by_N, rate, args.distort, args.figures)
    return exit_code(checks + cor_checks)


if __name__ == "__main__":
    raise SystemExit(main())
