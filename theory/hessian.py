"""Smoothness by power iteration on Hessian-vector products (docs/method.md section 6, (A1)).

A function is L-smooth on a region when ||grad f(x) - grad f(y)|| <= L ||x - y||; for a twice
differentiable f that is L = sup over the region of the spectral norm ||hess f(x)||_2 =
max_i |lambda_i(x)|. We estimate ||hess f(x)||_2 by power iteration, v <- Hv / ||Hv||, reading
the estimate as ||Hv|| for the unit v: it never overestimates (||Hv|| <= ||H|| for ||v|| = 1),
and it converges to max |lambda| even when +lambda and -lambda tie (the loss is non-convex in
X = [B; A], so Hessians are indefinite). The Hessian is never formed: each step is one HVP.
"""

from __future__ import annotations

from typing import Callable

import torch


def power_iteration(hvp: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor,
                    iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate ||H||_2 = max |lambda(H)| from HVPs; v0 is (..., p), batched over leading dims.

    Returns (estimate (...,), last unit vector (..., p)).
    """
    v = v0 / v0.norm(dim=-1, keepdim=True)
    est = torch.zeros(v0.shape[:-1], dtype=v0.dtype)
    for _ in range(iters):
        w = hvp(v)  # (..., p)
        est = w.norm(dim=-1)  # ||H v|| with ||v|| = 1: a lower bound on ||H||_2
        v = w / est.clamp_min(1e-300).unsqueeze(-1)
    return est, v


def autograd_hvp(loss: Callable[[torch.Tensor], torch.Tensor],
                 x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> hess loss(x) v for a loss of one flat vector: the gradient graph is built once, and
    each HVP is one more backward through it (the Hessian is symmetric, so H^T v = H v)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(x), x, create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)[0].detach()
    return hvp


def hessian_norms(per_copy_loss: Callable[[torch.Tensor], torch.Tensor], xs: torch.Tensor,
                  iters: int, g: torch.Generator) -> torch.Tensor:
    """||hess f(x)||_2 for many points at once: xs (..., p); per_copy_loss(xs) -> (...) values,
    each depending on its own copy only, so the Hessian of their sum is block diagonal and one
    batched power iteration runs on every block. Returns (...,) estimates."""
    hvp = autograd_hvp(lambda y: per_copy_loss(y).sum(), xs)
    return power_iteration(hvp, torch.randn(xs.shape, generator=g, dtype=xs.dtype), iters)[0]
