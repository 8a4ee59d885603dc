"""Theorem 4.4 where its noise terms carry the inequality (docs/method.md section 6).

The checks of theory/convergence.py start far from a stationary point and run deterministic-
looking descent: the gap term 4 (f^S(X^0) - f*) / (gamma T H) alone already bounds what they
observe, so they cannot tell whether the sigma terms are right. Here the observed average is
made of gradient noise:

- minibatch b = 1 and label noise, so sigma_g^2 is large;
- X^0 is the end of a long gradient descent on f^S, so f^S(X^0) - f* ~ 0 and the gap term
  vanishes: every T measures the stationary gradient floor;
- a flat planted spectrum and whitened inputs (theory/lsq_problem.py), so the curvature is the
  same in every direction that carries noise and L sigma_g^2 is close to tr(hess Sigma_xi):
  the bound can be within two orders of magnitude of the floor (for a quadratic, its constants
  6 + 12 against the floor's 1/2 already make it >= 36x loose).

Two settings: every client at k/r = 8/8 with identical data (sigma_s = sigma_h = 0: only sigma_g
is left, and dividing sigma_g by 10, i.e. `--distort sigma_g2=0.01`, makes the check FAIL), and
the paper's mixed ratios k_i = 1, 2, 4, 6 of 8 (sigma_s and L_tilde enter). Each term of the
bound is printed beside the observation, with its share of the bound: the gap term is ~0, so
the bound with the gap term alone would fail.

    python -m theory.noise [--quick] [--distort sigma_g2=0.01 (must FAIL)]
"""

from __future__ import annotations

import math

import torch

from theory.bound import bound_terms
from theory.calibration import Effort, Outcome, calibrate
from theory.constants import smoothness_L
from theory.convergence import add_distort_argument, outcome_checks, parse_distort
from theory.fslora_iteration import gradient_descent
from theory.lsq_problem import LSQConfig, LSQProblem
from theory.report import exit_code, print_checks, script_parser, setup

SPECTRUM = (0.7,) * 8  # flat: every direction of the factorisation curves alike
SETTINGS = {"k/r=8/8, same data": ((8, 8, 8, 8), True),
            "k/r=1,2,4,6 of 8": ((1, 2, 4, 6), False)}


def noise_problem(ranks: tuple[int, ...], shared_data: bool, samples: int, seed: int) -> LSQProblem:
    """Batch 1, label noise 1, no planted heterogeneity, whitened inputs, flat spectrum."""
    return LSQProblem(LSQConfig(ranks=ranks, samples=samples, batch=1, noise=1.0,
                                heterogeneity=0.0, spectrum=SPECTRUM, whiten=True,
                                shared_data=shared_data, seed=seed))


def noise_run(ranks: tuple[int, ...], shared_data: bool, samples: int, rounds: int, H: int,
              effort: Effort, seed: int, g: torch.Generator, label: str) -> Outcome:
    """The setting's problem, X^0 moved to the end of `effort.gd_steps` of gradient descent on
    f^S (so the gap term ~ 0), then FSLoRA at the calibrated gamma_max (theory/calibration.py)."""
    problem = noise_problem(ranks, shared_data, samples, seed)
    step = 0.5 / smoothness_L(problem, problem.x0[None], effort.power_iters, g)
    problem.x0 = gradient_descent(problem, step, effort.gd_steps)[1][-1].clone()
    return calibrate(problem, rounds, H, effort, g, label)


def term_table(label: str, out: Outcome, H: int, terms_of=bound_terms) -> list[str]:
    """One line per term of the bound at the final T, beside the observation: its share, its
    looseness (the term over the observed average) and the observed average over the bound
    without it, which exceeds 1 exactly where dropping that term would fail the check here.
    `terms_of(constants, gamma, T, H)`: Theorem 4.4's terms, or the derived theorem's; terms
    that are 0 here (their sigma is 0) are left out."""
    T = len(out.observed)
    terms = {k: float(v) for k, v in terms_of(out.constants, out.step, T, H).items()}
    full, obs = sum(terms.values()), float(out.observed[-1])
    lines = [f"{label}: T={T}, gamma={out.step:.4g}; observed (1/T) sum ||grad f^S||^2 = "
             f"{obs:.4g}; bound = {full:.4g} (observed / bound {obs / full:.3g})"]
    lines += [f"    {name:<16} {v:10.4g}  ({v / full:6.1%} of the bound; looseness {v / obs:.3g}; "
              f"observed / the bound without it {obs / (full - v) if full > v else math.inf:.3g})"
              for name, v in terms.items() if v > 0]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=1000, help="T")
    add_distort_argument(parser, "sigma_g2=0.01, i.e. sigma_g / 10, at k/r = 8/8,")
    args = parser.parse_args(argv)
    distort = parse_distort(args.distort)
    samples, H, effort = 200, 2, Effort(seeds=2, gd_steps=4000, power_iters=60)
    if args.quick:
        args.rounds = 150
        effort = Effort(seeds=1, gd_steps=1500, power_iters=30)
    g = setup(args.seed)
    print(f"seed {args.seed}; float64; least squares m=n=r=8, batch 1, label noise 1, flat "
          f"spectrum {SPECTRUM[0]}, whitened inputs, n_i={samples}; T={args.rounds}, H={H}")
    checks, lines = [], []
    for label, (ranks, shared) in SETTINGS.items():
        # constants over every round's global iterate and one local iterate at 8/8; the
        # mixed setting (70 index sets per client) over 40 rounds' points
        keep = args.rounds if shared else 40
        out = noise_run(ranks, shared, samples, args.rounds, H,
                        Effort(**{**vars(effort), "keep_points": keep}), args.seed, g, label)
        c = out.constants
        lines += term_table(label, out, H)
        lines.append(f"    constants: L={c.L:.4g} sigma_g^2={c.sigma_g2:.4g} "
                     f"sigma_s^2={c.sigma_s2:.4g} c_h={c.c_h:.3g} sigma_h^2={c.sigma_h2:.4g} "
                     f"gap={c.gap:.3g}; {len(out.points)} points measured")
        checks += outcome_checks(label, out, H, distort)
    print("\n" + "\n".join(lines))
    print_checks("Theorem 4.4 in the noise-dominated regime", checks)
    return exit_code(checks)


if __name__ == "__main__":
    raise SystemExit(main())
