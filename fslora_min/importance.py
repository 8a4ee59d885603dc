"""Importance-based index sets: the ablation of the paper's last empirical claim (docs/method.md
section 5, `fslora-topk` and `fslora-importance`).

Two rules that prefer the rank indices j with large |b_j| |a_j| (b_j column j of B, a_j row j
of A: the size of rank j's contribution b_j a_j to B A):

- top-k WITHOUT reweighting: I = the k indices of largest |b_j| |a_j|, scale r / k as FSLoRA.
  Deterministic given (B, A), so E[S] != I: the sketched objective is biased.
- importance WITH reweighting: index j is included with probability pi_j (sum_j pi_j = k,
  0 < pi_j <= 1), drawn by systematic sampling, which has exactly these marginals and always
  exactly k indices; S = sum_{j in I} (1 / pi_j) e_j e_j^T, so

      E[S] = sum_j pi_j * (1 / pi_j) e_j e_j^T = I_r      (unbiased, like FSLoRA's r/k).

  With pi_j = k / r for all j this is FSLoRA's uniform sketch in distribution of scales.
"""

from __future__ import annotations

import torch

from fslora_min.sketch import Sketch, check_rank_pair


def rank_importance(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """q_j = |b_j| |a_j| for j < r: B (m, r), A (r, n) -> (r,) float64, on the CPU (sketches are
    drawn there, from CPU generators, whatever device the factors live on)."""
    return (B.detach().double().norm(dim=0) * A.detach().double().norm(dim=1)).cpu()  # (r,)


def top_k_index(scores: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """The k indices of largest score, ties broken uniformly at random (B = 0 at the start)."""
    r = scores.numel()
    check_rank_pair(r, k)
    perm = torch.randperm(r, generator=generator)  # random order, then a stable sort
    order = torch.argsort(scores[perm], descending=True, stable=True)
    return perm[order[:k]].sort().values


def inclusion_probabilities(scores: torch.Tensor, k: int, uniform_mix: float) -> torch.Tensor:
    """pi_j proportional to the scores, capped at 1, summing to k; mixed with k/r for pi_j > 0.

        pi = (1 - lambda) * min(1, c q) + lambda * k / r,   c such that sum_j min(1, c q_j) = k

    Capping is done by the usual iteration: indices whose share exceeds 1 get exactly 1 and the
    rest of the budget is spread over the others in proportion to q. `uniform_mix` = lambda in
    (0, 1] keeps every pi_j >= lambda k / r > 0, which unbiasedness needs.
    """
    r = scores.numel()
    check_rank_pair(r, k)
    if not 0 < uniform_mix <= 1:
        raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix!r}")
    q = scores.double().clamp(min=0)
    pi = torch.full((r,), k / r, dtype=torch.float64)
    if q.sum() > 0:
        capped = torch.zeros(r, dtype=torch.bool)
        while True:  # at most r passes: each pass caps at least one more index or stops
            free = ~capped & (q > 0)
            budget = k - capped.sum().item()
            if budget <= 0 or not free.any():
                break
            share = torch.where(free, q * budget / q[free].sum(), torch.zeros_like(q))
            over = free & (share >= 1)
            if not over.any():
                break
            capped |= over
        prop = torch.where(capped, torch.ones_like(q), share)
        if prop.sum() < k - 1e-9:  # fewer positive scores than k: spread the rest evenly
            rest = prop < 1
            prop[rest] += (k - prop.sum()) / rest.sum()
        pi = (1 - uniform_mix) * prop.clamp(max=1) + uniform_mix * pi
    return pi


def systematic_sample(pi: torch.Tensor, u: float) -> torch.Tensor:
    """Systematic sampling: the indices j whose interval [C_{j-1}, C_j) holds a point u + m.

    C is the cumulative sum of pi (sum k, every pi_j <= 1) and m = 0..k-1. A point falls in
    interval j with probability exactly pi_j and never twice (its length is <= 1), so
    P(j in I) = pi_j and |I| = k for every u in [0, 1).
    """
    k = round(pi.sum().item())
    if abs(pi.sum().item() - k) > 1e-6 or (pi > 1 + 1e-12).any() or (pi <= 0).any():
        raise ValueError(f"inclusion probabilities must lie in (0, 1] and sum to an integer, "
                         f"got sum {pi.sum().item()!r}")
    upper = torch.cumsum(pi, 0)  # C_j
    upper[-1] = k  # exact total, so the last point u + k - 1 < k always lands
    points = u + torch.arange(k, dtype=torch.float64)  # (k,)
    return torch.searchsorted(upper, points, right=True)  # sorted, distinct


def importance_sketch(scores: torch.Tensor, k: int, uniform_mix: float,
                      generator: torch.Generator) -> Sketch:
    """S = sum_{j in I} (1 / pi_j) e_j e_j^T with P(j in I) = pi_j: E[S] = I_r."""
    pi = inclusion_probabilities(scores, k, uniform_mix)
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    index = systematic_sample(pi, u)
    return Sketch(index, scores.numel(), (1.0 / pi[index]).float())


def exact_sketch_mean(pi: torch.Tensor) -> torch.Tensor:
    """E[diag S] of `importance_sketch`, by enumerating its finitely many outcomes.

    The sample is a step function of u: it changes only where a point u + m crosses some C_j,
    i.e. at the fractional parts of the C_j. Between consecutive breakpoints it is constant, so
    E[diag S] = sum over the pieces of (piece length) * diag S(piece).
    """
    upper = torch.cumsum(pi, 0)
    breaks = torch.cat([torch.zeros(1, dtype=torch.float64), torch.frac(upper),
                        torch.ones(1, dtype=torch.float64)]).unique().sort().values
    mean = torch.zeros_like(pi)
    for lo, hi in zip(breaks[:-1].tolist(), breaks[1:].tolist()):
        index = systematic_sample(pi, (lo + hi) / 2)
        mean[index] += (hi - lo) / pi[index]
    return mean
