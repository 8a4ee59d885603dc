"""Corollary 4.5 over T, N and H: at gamma_T = sqrt(N / (T H L_tilde)) and at one fixed gamma.

Corollary 4.5 puts gamma_T = sqrt(N / (T H L_tilde)) into Theorem 4.4 (allowed once
T >= N / (H L_tilde gamma_max^2)), and the bound becomes C / sqrt(T H N) (`corollary_rate`,
theory/bound.py). On the least-squares problem (r = 4, every client at k = 2: k/r = 1/2, and
E_S over all 6 index sets stays cheap) we run three sweeps from one base N = 4, H = 2: T (x1,
x2, x4 of T0 = 1.5 x the largest smallest-T the settings allow; once more, with the constants
measured over the runs' own points, if those put a gamma_T past gamma_max), N at H = 2, and H at N = 4, all at one T. For
each run: the constants measured again over every point it visits, gamma_T <= gamma_max,
observed <= bound, and the bound at gamma_T equal to the closed-form rate (so dropping N from
the step or the rate fails). Each sweep is run again at ONE fixed gamma (the smallest gamma_T,
which meets every setting's condition) as a control.

What the slopes against 1 / sqrt(T H N) say: these runs are gap-dominated, observed ~
(f^S(X^0) - f^S(X^T)) / (gamma T H) (printed beside them), so at gamma_T the observed average
~ gap sqrt(L_tilde) / sqrt(T H N) falls with slope 1 in T and H BY CONSTRUCTION of gamma_T;
in N it does too as far as gap and L_tilde stay put, but each N is a different problem (more
clients, more data). The fixed-gamma control shows what the runs themselves give: ~1/(T H)
in T and H, nothing from N.

    python -m theory.corollary [--quick] [--distort L=0.01 --distort gap=0.01 (must FAIL)]
"""

from __future__ import annotations

import math
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from theory.bound import (convergence_bound, corollary_min_rounds, corollary_rate,  # noqa: E402
                          corollary_step, max_step)
from theory.calibration import Effort, calibrate, measured_constants, run_seeds  # noqa: E402
from theory.convergence import add_distort_argument, parse_distort  # noqa: E402
from theory.lsq_problem import LSQConfig, LSQProblem  # noqa: E402
from theory.report import (Check, exit_code, loglog_slope, print_checks,  # noqa: E402
                           save_figure, script_parser, setup)

R, K = 4, 2  # global rank and every client's rank (k/r = 1/2)
SLACK = 1.5  # T0 = SLACK x the largest smallest-T: the constants grow over the new runs' points


def rate_checks(label: str, c, T: int, H: int) -> list[Check]:
    """Theorem 4.4's bound at gamma_T equals the closed-form rate C / sqrt(T H N)."""
    return [Check(f"{label}: bound at gamma_T == rate C/sqrt(T H N)",
                  float(convergence_bound(c, corollary_step(c, T, H), T, H)),
                  corollary_rate(c, T, H), "==", rtol=1e-9, construction=True)]


def run_point(problem: LSQProblem, base, T: int, H: int, gamma: float, effort: Effort, g,
              distort: dict, label: str) -> tuple[list[Check], dict]:
    """FSLoRA at gamma for T rounds; constants again over every point; the theorem's checks."""
    recs = run_seeds(problem, T, H, gamma, effort, label)
    points = base.points + [x for rec in recs for x in rec.points]
    measured = measured_constants(problem, points, base.f_star, effort, g)
    c = measured.scaled(**distort)
    observed = float(np.mean([rec.running_average()[-1] for rec in recs]))
    descent = float(np.mean([(rec.losses[0] - rec.losses[-1]) / (gamma * T * H) for rec in recs]))
    bound = float(convergence_bound(c, gamma, T, H))
    checks = [Check(f"{label}: gamma <= gamma_max", gamma, max_step(c, H), rtol=1e-12,
                    construction=True),
              Check(f"{label}: avg ||grad f^S||^2 <= bound", observed, bound)]
    return checks, {"label": label, "T": T, "H": H, "N": c.N, "gamma": gamma,
                    "observed": observed, "bound": bound, "descent": descent, "constants": measured}


def sweep(cases: list[tuple], gamma_of, effort: Effort, g, distort: dict,
          done: dict) -> tuple[list[Check], list[dict]]:
    """cases: (problem, base Outcome, T, H); gamma_of(case) -> the step of that run.
    `done` holds the runs made so far: the base setting, shared by the sweeps, runs once."""
    checks, rows = [], []
    for case in cases:
        problem, base, T, H = case
        key = (id(problem), T, H, gamma_of(case))
        if key not in done:
            label = f"N={problem.N} H={H} T={T} gamma={key[-1]:.4g}"
            done[key] = run_point(problem, base, T, H, key[-1], effort, g, distort, label)
            checks += done[key][0]
        rows.append(done[key][1])
    return checks, rows


def slope(rows: list[dict], key: str) -> float:
    x = [1 / math.sqrt(r["T"] * r["H"] * r["N"]) for r in rows]
    return loglog_slope(np.array(x), np.array([r[key] for r in rows]))


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'run':<36}{'T':>6}{'gamma':>10}{'observed':>11}{'bound':>10}{'descent id.':>12}"
          f"{'obs*sqrt(THN)':>15}")
    for r in rows:
        print(f"{r['label']:<36}{r['T']:6d}{r['gamma']:10.4g}{r['observed']:11.4g}"
              f"{r['bound']:10.4g}{r['descent']:12.4g}"
              f"{r['observed'] * math.sqrt(r['T'] * r['H'] * r['N']):15.4g}")
    print(f"  slopes against 1/sqrt(T H N): observed {slope(rows, 'observed'):.3f}, bound "
          f"{slope(rows, 'bound'):.3f}, descent identity {slope(rows, 'descent'):.3f}")


def sweeps(settings: dict, Ns, Hs, Tx, effort: Effort, g, distort: dict
           ) -> tuple[list[Check], dict, int]:
    """The T, N and H sweeps at gamma_T and at one fixed gamma, from each setting's constants."""
    t_min = {s: corollary_min_rounds(o.constants, s[1]) for s, (_, o) in settings.items()}
    T0 = math.ceil(SLACK * max(t_min.values()))
    print("smallest T the corollary allows: " + ", ".join(f"N={N} H={H}: {t}"
                                                          for (N, H), t in t_min.items())
          + f"; every sweep runs at T0 = {T0} (x{SLACK} the largest)")
    cases = {"T": [(*settings[4, 2], T0 * m, 2) for m in Tx],
             "N": [(*settings[N, 2], T0, 2) for N in Ns],
             "H": [(*settings[4, H], T0, H) for H in Hs]}
    gamma_T = lambda case: corollary_step(case[1].constants, case[2], case[3])
    fixed = min(gamma_T(case) for cs in cases.values() for case in cs)
    checks, results, done = [], {}, {}
    for (N, H), (_, out) in settings.items():
        checks += rate_checks(f"N={N} H={H}", out.constants, T0, H)
    for name, cs in cases.items():
        c1, at_T = sweep(cs, gamma_T, effort, g, distort, done)
        c2, at_fixed = sweep(cs, lambda case: fixed, effort, g, distort, done)
        checks += c1 + c2
        results[name] = (at_T, at_fixed)
        print_rows(f"{name} varies, at gamma_T = sqrt(N/(T H L_tilde)):", at_T)
        print_rows(f"{name} varies, at one fixed gamma = {fixed:.4g}:", at_fixed)
    return checks, results, T0


def plot(results: dict[str, tuple[list[dict], list[dict]]], folder: str) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.3))
    for ax, (name, (at_T, fixed)) in zip(np.atleast_1d(axes), results.items()):
        x = lambda rows: [1 / math.sqrt(r["T"] * r["H"] * r["N"]) for r in rows]
        ax.loglog(x(at_T), [r["bound"] for r in at_T], "s--", label=f"bound at gamma_T "
                  f"(slope {slope(at_T, 'bound'):.2f})")
        ax.loglog(x(at_T), [r["observed"] for r in at_T], "o-", label=f"observed at gamma_T "
                  f"(slope {slope(at_T, 'observed'):.2f})")
        ax.loglog(x(fixed), [r["observed"] for r in fixed], "^:", label=f"observed, fixed gamma "
                  f"(slope {slope(fixed, 'observed'):.2f})")
        ax.set(xlabel="1 / sqrt(T H N)", ylabel="(1/T) sum_t ||grad f^S(X^t)||^2",
               title=f"{name} varies")
        ax.legend(fontsize=7)
    fig.suptitle("Corollary 4.5: gamma_T = sqrt(N/(T H L_tilde)) against one fixed gamma "
                 f"(least squares, k/r = {K}/{R})")
    save_figure(fig, folder, "convergence_rate.png")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--calibration-rounds", type=int, default=200,
                        help="T of the runs that measure each setting's constants first")
    add_distort_argument(parser, "L=0.01 with gap=0.01")
    args = parser.parse_args(argv)
    distort = parse_distort(args.distort)
    effort, Ns, Hs, Tx = Effort(), (2, 4, 8), (1, 2, 4), (1, 2, 4)
    if args.quick:
        args.calibration_rounds = 120
        effort, Ns, Hs, Tx = Effort(seeds=1, gd_steps=300, power_iters=30, keep_points=6), \
            (2, 4), (1, 2), (1, 2)
    g = setup(args.seed)
    print(f"seed {args.seed}; float64; least squares m=n={LSQConfig.m}, r={R}, every k={K}; "
          f"N in {Ns} (H=2), H in {Hs} (N=4), T x {Tx}; {effort}")
    settings = {}  # (N, H) -> (problem, calibrated Outcome)
    for N, H in sorted({(4, 2)} | {(N, 2) for N in Ns} | {(4, H) for H in Hs}):
        problem = LSQProblem(LSQConfig(r=R, alpha=float(R), ranks=(K,) * N, seed=args.seed))
        settings[N, H] = problem, calibrate(problem, args.calibration_rounds, H, effort, g,
                                            f"N={N} H={H}")
    dropped: list[str] = []  # the first attempt's failing checks, when the sweeps ran again
    for attempt in range(2):  # once more if the new points moved the constants past gamma_T
        checks, results, T0 = sweeps(settings, Ns, Hs, Tx, effort, g, distort)
        late = [c for c in checks if "gamma_max" in c.name and not c.ok]
        if not late or attempt == 1:
            break
        dropped = [c.name for c in late]
        print(f"\n{len(late)} runs left gamma_max once measured over their own points: again, "
              f"with the constants of those points")
        settings = {s: (p, replace(o, constants=min(
            (row["constants"] for at_T, fixed in results.values() for row in at_T + fixed
             if row["N"] == s[0] and row["H"] == s[1]),
            key=lambda c: max_step(c, s[1]), default=o.constants)))
            for s, (p, o) in settings.items()}
    if dropped:  # the table below is the second attempt's: say so on every row and at the end
        for c in checks:
            c.name = f"[rerun] {c.name}"
    print_checks("Corollary 4.5 over T, N and H" + (" (RERUN: the sweeps ran twice)" if dropped
                                                      else ""), checks)
    if dropped:
        print(f"RERUN: the first attempt's sweeps were dropped; its failing checks: "
              f"{'; '.join(dropped)}")
    plot(results, args.figures)
    return exit_code(checks)


if __name__ == "__main__":
    raise SystemExit(main())
