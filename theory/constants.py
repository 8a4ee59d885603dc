"""Measuring the constants of assumptions (A1)-(A3) and f* on the least-squares problem.

Every constant is a sup over a region; we take the max over the points the runs visit (global
iterates X^t, clients' local iterates, and the path of gradient descent used for f*), with
every expectation computed exactly:

- L (A1): max over visited X, clients i, and every index set S (plus S = I) of
  ||hess f_i(P_S X)||_2, by power iteration on HVPs (theory/hessian.py). The points P_S X are
  where the fixed-sketch loss evaluates f_i (f~_i(X; S) = f_i(P_S X)), so the smoothness of f_i
  is needed there too.
- sigma_s^2 (A2): max over X, i of E_S ||grad f~_i(X; S) - grad f_i^S(X)||^2, averaging over all
  C(r, k_i) index sets: exact.
- sigma_g^2 (A2): max over X, i, S of the variance of a local minibatch gradient: b points drawn
  with replacement, so it is (1/b) (1/n_i) sum_xi ||grad l~(X, xi; S) - grad f~_i(X; S)||^2: exact.
- c_h, sigma_h^2 (A3): at every visited X we compute h_i = ||grad f_i^S - grad f^S||^2 and
  q = ||grad f^S||^2. For each c_h on a grid, sigma_h^2(c_h) = max(0, max_{X,i} h_i - c_h q) is
  the smallest sigma_h^2 that makes (A3) hold at every visited point. sigma_h^2(c_h) falls as
  c_h grows, to a floor set by the points near a stationary point (where q ~ 0 but h_i is not);
  we keep the knee: the smallest c_h whose sigma_h^2 is within 5% of that floor.
- L_s (only when asked): max over visited X of ||hess f^S(X)||_2, the smoothness of the global
  sketched objective itself, which the descent step of the derived theorem uses (its bound is
  L_bar = L mean_i (r/k_i), Prop. D.4). f^S is exact (all index sets), so is its Hessian.
- f*: the minimum of f^S over a long gradient descent from X^0 and over every visited point. A
  local method may overestimate inf f^S; that makes f^S(X^0) - f* smaller and so the bound
  smaller: the check only gets harder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from theory.bound import BoundConstants
from theory.hessian import hessian_norms
from theory.lsq_problem import LSQProblem, project

C_H_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


@dataclass
class Raw:
    """What the points give, before the fit of (c_h, sigma_h^2)."""

    L: float
    sigma_g2: float
    sigma_s2: float
    het: np.ndarray  # (K, N): ||grad f_i^S(X) - grad f^S(X)||^2 at each visited X
    grad_sq: np.ndarray  # (K,): ||grad f^S(X)||^2
    f_star: float
    f0: float
    L_s: float | None = None  # max ||hess f^S|| over the points, when measured


def smoothness_L(problem: LSQProblem, points: torch.Tensor, iters: int,
                 g: torch.Generator, chunk: int = 8, sketched: bool = True) -> float:
    """max over points X (K, p), clients i, index sets S and S = I of ||hess f_i(P_S X)||_2;
    with `sketched=False` only S = I: L over the visited X alone, without the P_S X points."""
    m, n, r = problem.dims
    D = torch.ones(problem.N, 1, r)  # S = I
    if sketched:
        D = torch.cat([problem.D, D], 1)  # (N, C + 1, r): all S, and I
    best = 0.0
    for xs in points.split(chunk):
        px = project(xs[:, None, None, :], D, m, n, r)  # (K', N, C + 1, p)
        loss = lambda y: problem.loss(y, problem.Z[:, None], problem.Y[:, None], torch.ones(r))
        norms = hessian_norms(loss, px, iters, g)  # (K', N, C + 1)
        valid = torch.ones(problem.N, 1, dtype=torch.bool)
        if sketched:
            valid = torch.cat([problem.w > 0, valid], 1)
        best = max(best, float(norms[:, valid].max()))
    return best


def variances_at(problem: LSQProblem, x: torch.Tensor) -> tuple[float, float, torch.Tensor, float]:
    """At one X: (sigma_s^2, sigma_g^2, h_i (N,), ||grad f^S||^2), every expectation exact."""
    N, C, p = problem.D.shape[0], problem.D.shape[1], x.numel()
    ni, b = problem.cfg.samples, problem.cfg.batch
    gfix = problem.fixed_sketch_grads(x)  # (N, C, p): grad f~_i(X; S_c)
    gi = (gfix * problem.w[..., None]).sum(1)  # (N, p): grad f_i^S(X)
    sig_s = float(((gfix - gi[:, None]).pow(2).sum(-1) * problem.w).sum(1).max())
    # per-sample gradients grad l~(X, xi; S_c): one copy of X per (i, c, xi)
    xs = x.detach().expand(N, C, ni, p).clone().requires_grad_(True)
    Zs = problem.Z.transpose(1, 2)[:, None, :, :, None]  # (N, 1, n_i, n, 1)
    Ys = problem.Y.transpose(1, 2)[:, None, :, :, None]  # (N, 1, n_i, m, 1)
    per = problem.loss(xs, Zs, Ys, problem.D[:, :, None, :])  # (N, C, n_i)
    (gs,) = torch.autograd.grad(per.sum(), xs)  # (N, C, n_i, p)
    var = (gs - gs.mean(2, keepdim=True)).pow(2).sum(-1).mean(2) / b  # (N, C)
    sig_g = float(var[problem.w > 0].max())
    gbar = gi.mean(0)  # (p,): grad f^S(X)
    return sig_s, sig_g, (gi - gbar).pow(2).sum(-1), float(gbar.pow(2).sum())


def fixed_sketch_constants(problem: LSQProblem, points: torch.Tensor, iters: int,
                           g: torch.Generator, chunk: int = 8) -> np.ndarray:
    """L_i = max over points X (K, p) and client i's index sets S of ||hess f~_i(X; S)||_2: (N,),
    the fixed-sketch smoothness each client's local steps see (at most (r/k_i) L)."""
    (N, C, r), p = problem.D.shape, points.shape[1]
    loss = lambda y: problem.loss(y, problem.Z[:, None], problem.Y[:, None], problem.D)
    best = np.zeros(N)
    for xs in points.split(chunk):
        norms = hessian_norms(loss, xs[:, None, None].expand(len(xs), N, C, p).contiguous(),
                              iters, g)  # (K', N, C)
        norms = norms.masked_fill(~(problem.w > 0), 0.0)  # padding index sets
        best = np.maximum(best, norms.amax((0, 2)).numpy())
    return best


def sketched_objective_smoothness(problem: LSQProblem, points: torch.Tensor, iters: int,
                                  g: torch.Generator, chunk: int = 8) -> float:
    """L_s = max over points X (K, p) of ||hess f^S(X)||_2, f^S exact over all index sets."""
    return max(float(hessian_norms(problem.sketched_loss, xs, iters, g).max())
               for xs in points.split(chunk))


def measure(problem: LSQProblem, points: list[torch.Tensor], f_star: float, iters: int,
            g: torch.Generator, global_smoothness: bool = False) -> Raw:
    """L, sigma_s^2, sigma_g^2 and the heterogeneity data over the visited points (see above);
    L_s too when `global_smoothness`."""
    pts = torch.stack(points)  # (K, p)
    L = smoothness_L(problem, pts, iters, g)
    L_s = sketched_objective_smoothness(problem, pts, iters, g) if global_smoothness else None
    sig_s, sig_g, het, gsq = 0.0, 0.0, [], []
    for x in tqdm(pts, desc="variances", leave=False, mininterval=1.0):
        s, v, h, q = variances_at(problem, x)
        sig_s, sig_g = max(sig_s, s), max(sig_g, v)
        het.append(h.numpy())
        gsq.append(q)
    f_visited = float(problem.sketched_loss(pts).min())
    return Raw(L, sig_g, sig_s, np.array(het), np.array(gsq), min(f_star, f_visited),
               float(problem.sketched_loss(problem.x0)), L_s)


def heterogeneity_bound(raw: Raw, c_h: float) -> float:
    """The smallest sigma_h^2 with h_i <= c_h ||grad f^S||^2 + sigma_h^2 at every visited point."""
    return max(0.0, float((raw.het - c_h * raw.grad_sq[:, None]).max()))


def fit_constants(raw: Raw, ratios: tuple[float, ...]) -> BoundConstants:
    """BoundConstants from the measurements, with (c_h, sigma_h^2) at the knee of the fit (above)."""
    floor = heterogeneity_bound(raw, C_H_GRID[-1])
    c_h = next(c for c in C_H_GRID if heterogeneity_bound(raw, c) <= 1.05 * floor + 1e-300)
    return BoundConstants(raw.L, raw.sigma_g2, raw.sigma_s2, c_h, heterogeneity_bound(raw, c_h),
                          raw.f0 - raw.f_star, ratios, raw.L_s)
