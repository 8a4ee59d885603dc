"""Run FSLoRA at the theorem's step size, with the constants measured where the runs go.

The step size needs the constants, and the constants are measured over the points the runs
visit, which depend on the step size. We go round until they agree:

    points <- the gradient-descent path used for f*
    repeat:  constants <- measure(points);  gamma <- 0.98 gamma_max(constants)  (Theorem 4.4;
             the 2% margin absorbs the small growth of the constants over the new points)
             run FSLoRA with gamma (several seeds); points <- points + the points it visited
             constants <- measure(points)
    until    gamma <= gamma_max(constants)   (at most `attempts` times; else the check FAILs)

so the final constants hold over every point of the final runs, and the final gamma meets
the condition with them. `Outcome.observed` averages the seeds' running averages: an estimate
of the expectation (1/T) sum_t E||grad f^S(X^t)||^2 the theorem bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from theory.bound import BoundConstants, max_step
from theory.constants import fit_constants, measure, smoothness_L
from theory.fslora_iteration import RunConfig, RunRecord, gradient_descent, run_fslora
from theory.lsq_problem import LSQProblem

MARGIN = 0.98  # gamma = MARGIN * gamma_max
StepRule = Callable[[BoundConstants, int], float]


@dataclass
class Effort:
    """How hard to work: the --quick switch of the scripts picks the small one."""

    seeds: int = 2  # runs averaged for the observed curve
    gd_steps: int = 3000  # gradient descent steps for f*
    power_iters: int = 100  # power iterations per Hessian norm
    keep_points: int = 16  # rounds per run whose iterates join the measured region
    attempts: int = 4
    measure_L_s: bool = False  # also measure the smoothness of f^S itself (the derived theorem)


@dataclass
class Outcome:
    constants: BoundConstants
    f_star: float  # the f* estimate (GD), before the minimum over visited points
    step: float  # gamma used
    observed: np.ndarray  # (T,): mean over seeds of (1/T) sum_{t<T} ||grad f^S(X^t)||^2
    records: list[RunRecord]
    points: list[torch.Tensor]


def run_seeds(problem: LSQProblem, rounds: int, H: int, step: float, effort: Effort,
              desc: str) -> list[RunRecord]:
    return [run_fslora(problem, RunConfig(rounds, H, step, seed, effort.keep_points),
                       desc=f"{desc} seed {seed}") for seed in range(effort.seeds)]


def measured_constants(problem: LSQProblem, points: list[torch.Tensor], f_star: float,
                       effort: Effort, g: torch.Generator) -> BoundConstants:
    raw = measure(problem, points, f_star, effort.power_iters, g, effort.measure_L_s)
    return fit_constants(raw, problem.ratios)


def calibrate(problem: LSQProblem, rounds: int, H: int, effort: Effort, g: torch.Generator,
              desc: str = "", step_rule: StepRule = max_step) -> Outcome:
    """The loop of the module docstring; returns the last runs and their constants.
    `step_rule(constants, H)` is gamma_max: Theorem 4.4's, or the derived theorem's."""
    # GD only needs to descend: step 1 / (2 L), L measured at X^0 and its sketched images
    gd_step = 0.5 / smoothness_L(problem, problem.x0[None], effort.power_iters, g)
    f_star, points = gradient_descent(problem, gd_step, effort.gd_steps)
    consts = measured_constants(problem, points, f_star, effort, g)
    for _ in range(effort.attempts):
        step = MARGIN * step_rule(consts, H)
        records = run_seeds(problem, rounds, H, step, effort, desc)
        run_points = points + [x for rec in records for x in rec.points]
        consts = measured_constants(problem, run_points, f_star, effort, g)
        if step <= step_rule(consts, H) * (1 + 1e-12):
            break
    observed = np.mean([rec.running_average() for rec in records], axis=0)
    return Outcome(consts, f_star, step, observed, records, run_points)
