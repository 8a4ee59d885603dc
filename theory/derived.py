"""The convergence theorem derived with the sharper fixed-sketch constant, run at its own step.

README.md ('Theorem 4.4 derived with the sharper constant') derives, line by line, a bound on
(1/T) sum_t E||grad f^S(X^t)||^2 from (A1)-(A3) with f~_i(.; S) (r/k_i) L-smooth and f^S
L_s = L_bar-smooth (Prop. D.4), under the step conditions C1-C3 (theory/bound.py,
`derived_step_conditions`). Here, on the least-squares problem: calibrate gamma to 0.98 of the
derived gamma_max (constants measured over every point the final runs visit,
theory/calibration.py), print each step condition beside Theorem 4.4's gamma_max and the
'L_bar in place of L_tilde' one, each term of the derived bound beside the observed average,
and L over the visited X alone beside L over X and the points P_S X (the (r/k) L constant
needs (A1) there, up to sqrt(r/k) times as far out).

    python -m theory.derived [--quick] [--distort L=0.01 --distort gap=0.001 (must FAIL)]
"""

from __future__ import annotations

import numpy as np
import torch

from theory.bound import (derived_bound, derived_bound_terms, derived_max_step,
                          derived_step_conditions, max_step)
from theory.calibration import Effort, Outcome, calibrate
from theory.constants import smoothness_L
from theory.convergence import add_distort_argument, parse_distort
from theory.lsq_problem import LSQConfig, LSQProblem
from theory.report import Check, exit_code, print_checks, script_parser, setup


def derived_checks(label: str, out: Outcome, H: int, distort: dict) -> list[Check]:
    """gamma <= the derived gamma_max, and observed <= the derived bound at every T (the row
    shows the tightest T)."""
    c = out.constants.scaled(**distort)
    bound = derived_bound(c, out.step, np.arange(1, len(out.observed) + 1), H)
    t = int(np.argmax(out.observed / bound))
    return [Check(f"{label}: gamma <= derived gamma_max", out.step, derived_max_step(c, H),
                  rtol=1e-12),
            Check(f"{label}: avg ||grad f^S||^2 <= derived bound", out.observed[t], bound[t],
                  note=f"tightest at T={t + 1}")]


def report(label: str, problem: LSQProblem, out: Outcome, H: int, effort: Effort,
           g: torch.Generator) -> None:
    """The step conditions, the bound term by term at the tightest T, and L with/without P_S X."""
    c, T = out.constants, len(out.observed)
    print(f"\n{label}: gamma = {out.step:.4g} (0.98 of the derived gamma_max)")
    for name, value in derived_step_conditions(c, H).items():
        print(f"  {name:<45} {value:.4g}")
    print(f"  {'Theorem 4.4 gamma_max (L_tilde)':<45} {max_step(c, H):.4g}")
    print(f"  {'L_bar in place of L_tilde (not derived)':<45} {max_step(c, H, sharp=True):.4g}")
    bound = derived_bound(c, out.step, np.arange(1, T + 1), H)
    t = int(np.argmax(out.observed / bound))
    terms = derived_bound_terms(c, out.step, t + 1, H)
    print(f"  at the tightest T = {t + 1}: observed {out.observed[t]:.4g}, bound {bound[t]:.4g} "
          f"(ratio {out.observed[t] / bound[t]:.3g}); at T = {T}: observed "
          f"{out.observed[-1]:.4g}, bound {bound[-1]:.4g}")
    for name, value in terms.items():
        print(f"    {name:<14} {float(value):10.4g}  ({float(value) / bound[t]:6.1%})")
    pts = torch.stack(out.points)
    visited = smoothness_L(problem, pts, effort.power_iters, g, sketched=False)
    print(f"  L over the {len(pts)} visited X alone: {visited:.4g}; over X and every P_S X: "
          f"{c.L:.4g} (ratio {c.L / visited:.3g})")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=600, help="T")
    add_distort_argument(parser, "L=0.01 with gap=0.001")
    args = parser.parse_args(argv)
    distort = parse_distort(args.distort)
    effort = Effort(seeds=2, gd_steps=1500, power_iters=60, keep_points=12)
    if args.quick:
        args.rounds, effort = 100, Effort(seeds=1, gd_steps=300, power_iters=30, keep_points=6)
    g = setup(args.seed)
    H, r = 2, 8
    print(f"seed {args.seed}; float64; least squares m=n={LSQConfig.m}, r={r}, N=4, H={H}; "
          f"T={args.rounds}; {effort}")
    checks = []
    for ranks in ((4, 4, 4, 4), (1, 2, 4, 6)):
        label = f"k/r={','.join(map(str, ranks))}/{r}"
        problem = LSQProblem(LSQConfig(r=r, ranks=ranks, seed=args.seed))
        out = calibrate(problem, args.rounds, H, effort, g, label, step_rule=derived_max_step)
        report(label, problem, out, H, effort, g)
        checks += derived_checks(label, out, H, distort)
    print_checks("the derived theorem at its own step", checks)
    return exit_code(checks)


if __name__ == "__main__":
    raise SystemExit(main())
