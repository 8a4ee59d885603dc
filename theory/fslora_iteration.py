"""FSLoRA on the least-squares problem, written out for the theory (docs/method.md section 3).

One round t, with all N clients participating and plain averaging (eta_g = 1):

    for each client i:  draw S_i (a uniform k_i-subset, fslora_min.sketch.sample_sketch)
                        X_i <- X^t;  H times:  X_i <- X_i - gamma * grad l~(X_i, xi; S_i)
                        (xi: b data points drawn with replacement)
    X^{t+1} = X^t + (1/N) sum_i (X_i - X^t)

Training the compact (b, a) of a client equals SGD on X for the loss F_i(W0 + s B S A): the
unselected rows of A and columns of B get zero gradient (docs/method.md section 3, step 3). Every
round we also record ||grad f^S(X^t)||^2, exactly (all index sets), and keep the points the run
visits (global iterates and the clients' local iterates), where the constants are measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import trange

from fslora_min.sketch import sample_sketch
from theory.lsq_problem import LSQProblem


@dataclass
class RunConfig:
    rounds: int = 200  # T
    local_steps: int = 2  # H
    step: float = 0.01  # gamma, the local learning rate
    seed: int = 0
    keep_points: int = 24  # how many rounds' points (global and local iterates) to keep


@dataclass
class RunRecord:
    grad_sq: np.ndarray  # (T,): ||grad f^S(X^t)||^2, t = 0..T-1
    losses: np.ndarray  # (T + 1,): f^S(X^t)
    points: list[torch.Tensor] = field(default_factory=list)  # visited X, each (p,)

    def running_average(self) -> np.ndarray:
        """(1/T) sum_{t<T} ||grad f^S(X^t)||^2 for T = 1..rounds: the theorem's left side."""
        return np.cumsum(self.grad_sq) / np.arange(1, len(self.grad_sq) + 1)


def local_sgd_step(problem: LSQProblem, xl: torch.Tensor, d: torch.Tensor, step: float,
                   g: torch.Generator) -> torch.Tensor:
    """One SGD step of every client at once: xl (N, p), d (N, r) the clients' diag(S_i)."""
    N, ni, b = problem.N, problem.cfg.samples, problem.cfg.batch
    idx = torch.randint(ni, (N, b), generator=g)  # (N, b): a minibatch per client
    Zb = torch.gather(problem.Z, 2, idx[:, None, :].expand(-1, problem.cfg.n, -1))  # (N, n, b)
    Yb = torch.gather(problem.Y, 2, idx[:, None, :].expand(-1, problem.cfg.m, -1))  # (N, m, b)
    xl = xl.detach().requires_grad_(True)
    (gr,) = torch.autograd.grad(problem.loss(xl, Zb, Yb, d).sum(), xl)  # (N, p)
    return (xl - step * gr).detach()


def run_fslora(problem: LSQProblem, cfg: RunConfig, desc: str = "FSLoRA") -> RunRecord:
    """T rounds of FSLoRA from X^0 (seeded by cfg.seed); see the module docstring."""
    g = torch.Generator().manual_seed(cfg.seed)
    r, T = problem.cfg.r, cfg.rounds
    keep = set(np.linspace(0, T - 1, min(cfg.keep_points, T)).round().astype(int).tolist())
    x = problem.x0.clone()
    grad_sq, losses, points = np.zeros(T), np.zeros(T + 1), []
    for t in trange(T, desc=desc, leave=False, mininterval=1.0):
        grad_sq[t] = float(problem.sketched_grad(x).pow(2).sum())
        losses[t] = float(problem.sketched_loss(x))
        d = torch.stack([sample_sketch(r, k, g).diagonal() for k in problem.cfg.ranks])  # (N, r)
        xl = x.expand(problem.N, -1)  # (N, p): every client starts from X^t
        for h in range(cfg.local_steps):
            xl = local_sgd_step(problem, xl, d, cfg.step, g)
            if t in keep and h == cfg.local_steps // 2:
                points.append(xl[t % problem.N].clone())  # one client's local iterate
        if t in keep:
            points.append(x.clone())
        x = x + (xl - x).mean(0)  # plain averaging of the clients' deltas
    losses[T] = float(problem.sketched_loss(x))
    return RunRecord(grad_sq, losses, points + [x.clone()])


def gradient_descent(problem: LSQProblem, step: float, steps: int) -> tuple[float, list]:
    """Full-gradient descent on f^S from X^0: its final value estimates f*; returns (value, path)."""
    x, path = problem.x0.clone(), []
    keep = max(1, steps // 8)
    for t in trange(steps, desc="GD for f*", leave=False, mininterval=1.0):
        x = x - step * problem.sketched_grad(x)
        if t % keep == 0:
            path.append(x.clone())
    return float(problem.sketched_loss(x)), path + [x]
