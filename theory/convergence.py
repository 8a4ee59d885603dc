"""Theorem 4.4 and Corollary 4.5 checked on the least-squares LoRA problem (docs/method.md section 6).

For each setting (sketching ratio k/r, the paper's mixed ratios k_i = 1, 2, 4, 6 of 8, local
steps H, clients N) we measure the constants over the region the runs visit, run FSLoRA at the
theorem's largest allowed step gamma_max (theory/calibration.py), and compare, for every T, the
observed (1/T) sum_t ||grad f^S(X^t)||^2 (exact gradients, averaged over seeds) with the bound
(theory/bound.py), and with the sharper bound that has L_bar in place of L_tilde.

These runs start far from a stationary point, so the gap term carries the bound (for the noise
terms see theory/noise.py), and at each ratio's own gamma_max the observed average is ~ gap /
(gamma T H): its order over the ratios is set by gamma_max, so it is printed, not checked. The
ratios are then run again at ONE common step, where the late-round gradient floor is printed
beside the noise terms of the bound. Corollary 4.5 (over T, N and H) is theory/corollary.py.
How each constant is measured: theory/constants.py.

    python -m theory.convergence [--quick] [--distort L=0.01 --distort gap=0.01 (must FAIL)]
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from theory.bound import (L_bar, L_tilde, bound_terms, convergence_bound,  # noqa: E402
                          max_step)
from theory.calibration import Effort, Outcome, calibrate, measured_constants, run_seeds  # noqa
from theory.lsq_problem import LSQConfig, LSQProblem  # noqa: E402
from theory.report import (Check, exit_code, script_parser, print_checks,  # noqa: E402
                           save_figure, setup)


def parse_distort(items: list[str]) -> dict[str, float]:
    """--distort NAME=FACTOR items -> {NAME: FACTOR}; a bad item is an error naming the flag."""
    fields = ("L", "sigma_g2", "sigma_s2", "c_h", "sigma_h2", "gap", "L_s")
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


def add_distort_argument(parser, example: str) -> None:
    """--distort NAME=FACTOR (repeatable): multiply a measured constant in the bound, to show a
    check fails; `example` says which distortion must FAIL."""
    parser.add_argument("--distort", action="append", default=[], metavar="NAME=FACTOR",
                        help=f"multiply a measured constant in the bound by FACTOR ({example} "
                             f"must FAIL); repeatable")


def bound_curves(out: Outcome, H: int, distort: dict) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 4.4's bound for T = 1..len(observed), with L_tilde and with L_bar."""
    c = out.constants.scaled(**distort)
    T = np.arange(1, len(out.observed) + 1)
    return convergence_bound(c, out.step, T, H), convergence_bound(c, out.step, T, H, sharp=True)


def outcome_checks(label: str, out: Outcome, H: int, distort: dict) -> list[Check]:
    """The step condition, and observed <= bound at every T (the row shows the tightest T)."""
    c = out.constants.scaled(**distort)
    checks = [Check(f"{label}: gamma <= gamma_max", out.step, max_step(c, H), rtol=1e-12,
                    construction=True)]
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


def final_order(rows: list[tuple[str, Outcome, int]], values: list[float]) -> str:
    """Labels' ratios sorted by `values`, largest first, e.g. '1/8 > 2/8 > 4/8'."""
    return " > ".join(rows[i][0].split("=")[-1] for i in np.argsort(values)[::-1])


def floor(observed_runs: list, fraction: float = 0.25) -> float:
    """The stationary gradient floor: mean ||grad f^S(X^t)||^2 over the last quarter of rounds."""
    return float(np.mean([rec.grad_sq[-int(len(rec.grad_sq) * fraction):].mean()
                          for rec in observed_runs]))


def common_step_rows(problems: dict[str, LSQProblem], rows: list[tuple[str, Outcome, int]],
                     effort: Effort, g, distort: dict) -> tuple[list[Check], list[str], float]:
    """Every ratio again at ONE step, the smallest gamma_max (which meets every ratio's
    condition): at its own gamma_max each ratio's average is ~ gap / (gamma T H), so the order
    there is set by gamma_max; at a common gamma the late-round floor is compared with the noise
    terms of the bound. Constants are measured again over the new runs' points."""
    gamma = min(o.step for _, o, _ in rows)
    checks, lines, floors, noise_terms = [], [], [], []
    for label, out, H in rows:
        T = len(out.observed)
        recs = run_seeds(problems[label], T, H, gamma, effort, f"{label} common gamma")
        points = out.points + [x for rec in recs for x in rec.points]
        c = measured_constants(problems[label], points, out.f_star, effort, g).scaled(**distort)
        observed = np.mean([rec.running_average() for rec in recs], axis=0)
        terms = bound_terms(c, gamma, T, H)
        noise = sum(v for k, v in terms.items() if k != "gap")
        bound = convergence_bound(c, gamma, np.arange(1, T + 1), H)
        t = int(np.argmax(observed / bound))
        checks.append(Check(f"{label} at common gamma: gamma <= gamma_max", gamma,
                            max_step(c, H), rtol=1e-12, construction=True))
        checks.append(Check(f"{label} at common gamma: avg ||grad f^S||^2 <= bound",
                            observed[t], bound[t], note=f"tightest at T={t + 1}"))
        floors.append(floor(recs))
        noise_terms.append(float(noise))
        lines.append(f"{label:<18} gamma {gamma:.4g}  avg at T {observed[-1]:9.4g}  floor (last "
                     f"quarter) {floors[-1]:9.4g}  noise terms of the bound {float(noise):9.4g}  "
                     f"floor / noise terms {floors[-1] / float(noise):.3g}")
    lines.append(f"floor order, largest first: {final_order(rows, floors)}; noise terms: "
                 f"{final_order(rows, noise_terms)}")
    return checks, lines, gamma


def plot_curves(ax, rows: list[tuple[str, Outcome, int]], distort: dict, title: str) -> None:
    """Observed (solid) against the bound with L_tilde (dashed) and L_bar (dotted), per setting;
    the legend (one entry per setting, one per line style) sits outside the axes."""
    for i, (label, out, H) in enumerate(rows):
        T = np.arange(1, len(out.observed) + 1)
        bound, sharp = bound_curves(out, H, distort)
        ax.loglog(T, out.observed, "-", color=f"C{i}", label=label)
        ax.loglog(T, bound, "--", color=f"C{i}")
        ax.loglog(T, sharp, ":", color=f"C{i}")
    for style, name in (("-", "observed"), ("--", "bound (L_tilde)"), (":", "bound (L_bar)")):
        ax.plot([], [], style, color="k", label=name)
    ax.set(xlabel="rounds T", ylabel="(1/T) sum_t ||grad f^S(X^t)||^2", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot_all(ratios, Hs, Ns, distort: dict, folder: str) -> None:
    fig, ax = plt.subplots(figsize=(8.5, 5))
    plot_curves(ax, ratios, distort, "FSLoRA at each ratio's gamma_max: bound against observed")
    save_figure(fig, folder, "convergence_ratios.png")
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"wspace": 0.55})
    plot_curves(axes[0], Hs, distort, "local steps H (k/r = 1/2)")
    plot_curves(axes[1], Ns, distort, "clients N (k/r = 1/2)")
    save_figure(fig, folder, "convergence_sweeps.png")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=2000, help="T of the sweeps")
    add_distort_argument(parser, "L=0.01 with gap=0.01")
    args = parser.parse_args(argv)
    args.distort = parse_distort(args.distort)
    effort = Effort()
    ks, Hs, Ns, r, mixed_ranks = (1, 2, 4, 6, 8), (1, 2, 4), (2, 4, 8), 8, (1, 2, 4, 6)
    if args.quick:
        args.rounds, ks, Hs, Ns, mixed_ranks = 120, (2, 4, 8), (1, 2), (2, 4), (2, 4, 6, 8)
        effort = Effort(seeds=1, gd_steps=300, power_iters=30, keep_points=6)
    g = setup(args.seed)
    print(f"seed {args.seed}; float64; least squares m=n={LSQConfig.m}, r={r}; T={args.rounds}; "
          f"{effort}")

    problems = {}

    def setting(ranks: tuple[int, ...], H: int, label: str):
        problems[label] = LSQProblem(LSQConfig(r=r, ranks=ranks, seed=args.seed))
        return label, calibrate(problems[label], args.rounds, H, effort, g, label), H

    base = setting((4,) * 4, 2, "N=4 H=2 k/r=4/8")
    by_ratio = [setting((k,) * 4, 2, f"N=4 H=2 k/r={k}/{r}") if k != 4 else base for k in ks]
    mixed = [setting(mixed_ranks, 2, f"N=4 H=2 k/r={','.join(map(str, mixed_ranks))}/{r}")]
    by_H = [setting((4,) * 4, H, f"N=4 H={H} k/r=4/8") if H != 2 else base for H in Hs]
    by_N = [setting((4,) * N, 2, f"N={N} H=2 k/r=4/8") if N != 4 else base for N in Ns]
    rows = list(dict((label, (label, o, H))
                     for label, o, H in by_ratio + mixed + by_H + by_N).values())
    print_constants(rows)
    checks = [c for label, out, H in rows for c in outcome_checks(label, out, H, args.distort)]
    print(f"\nordering at each ratio's own gamma_max, T={args.rounds}, largest first (set by "
          f"gamma_max: the average is ~ gap / (gamma T H)): bound "
          f"{final_order(by_ratio, [bound_curves(o, H, {})[0][-1] for _, o, H in by_ratio])}; "
          f"observed {final_order(by_ratio, [o.observed[-1] for _, o, _ in by_ratio])}")
    common_checks, common_lines, gamma = common_step_rows(problems, by_ratio, effort, g,
                                                          args.distort)
    print(f"\nevery ratio at one step gamma = {gamma:.4g} (the smallest gamma_max):")
    print("\n".join(common_lines))
    checks += common_checks
    print_checks("Theorem 4.4: observed against the bound", checks)
    plot_all(by_ratio + mixed, by_H, by_N, args.distort, args.figures)
    return exit_code(checks)


if __name__ == "__main__":
    raise SystemExit(main())
