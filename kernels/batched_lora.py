"""Many clients' compact LoRA factors on one frozen base: the batched linear of a round.

    y_p = x_p W0^T + bias + (x_p a_p^T diag(c_p)) b_p^T        for each client p = 1..P

x: (P, T, n), the tokens of P clients side by side; W0: (m, n) and bias: (m,), shared and
frozen; b: (P, m, K), a: (P, K, n) the clients' compact factors zero-padded to K = max_p k_p;
c: (P, K) `client_scales`, each client's s * diag(S_p) at its ranks (c = s r / k_p for a uniform
sketch), 0 at its padded ranks.

What you will learn: why P small LoRA layers should be one batched matmul. The base GEMM is the
same matrix for every client, so it runs once over all P T tokens (one big GEMM instead of P
small ones); the low-rank terms differ per client, so they run as two batched matmuls
(`torch.bmm`, one launch each for all clients, on CPU and GPU alike). Padding to K costs
(K - k_p) / K of a term that is already small next to the base.

Why the padding is inert: c_p is 0 at a padded rank j, so j contributes nothing to y_p, and
its gradients dL/db_p[:, j] = (dy_p^T x_p a_p[j]^T) c_pj and
dL/da_p[j] = c_pj (dy_p b_p[:, j])^T x_p are exactly 0: a padded rank can never move under SGD
or AdamW (whose step is 0 for a zero gradient and zero state).

`batched_lora_linear_reference` runs the same thing one client at a time through the plain
single-client reference (kernels/reference.py); tests/test_engine.py compares the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import lora_linear_reference


def check_batched_inputs(x: torch.Tensor, weight: torch.Tensor, lora_B: torch.Tensor,
                         lora_A: torch.Tensor, client_scales: torch.Tensor) -> None:
    """Raise a ValueError naming the bad shape unless the inputs describe P clients' layers."""
    m, n = weight.shape
    if x.dim() != 3 or x.shape[-1] != n:
        raise ValueError(f"x must have shape (P, T, n={n}), got {tuple(x.shape)}")
    P = x.shape[0]
    K = lora_A.shape[1] if lora_A.dim() == 3 else -1
    if (tuple(lora_B.shape) != (P, m, K) or tuple(lora_A.shape) != (P, K, n)
            or tuple(client_scales.shape) != (P, K)):
        raise ValueError(f"expected b (P={P}, m={m}, K), a (P, K, n={n}) and client_scales (P, K) "
                         f"with one K, got {tuple(lora_B.shape)}, {tuple(lora_A.shape)} and "
                         f"{tuple(client_scales.shape)}")


def batched_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_B: torch.Tensor, lora_A: torch.Tensor,
                        client_scales: torch.Tensor) -> torch.Tensor:
    """y_p = x_p W0^T + bias + (x_p a_p^T diag(c_p)) b_p^T for all P clients; (P, T, m)."""
    check_batched_inputs(x, weight, lora_B, lora_A, client_scales)
    base = F.linear(x, weight, bias)  # (P, T, m): one GEMM over all P T tokens
    u = torch.bmm(x, lora_A.transpose(1, 2)) * client_scales[:, None, :]  # (P, T, K): the shrink
    return torch.baddbmm(base, u, lora_B.transpose(1, 2))  # (P, T, m): + the expand


def batched_lora_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, lora_B: torch.Tensor,
                                  lora_A: torch.Tensor,
                                  client_scales: torch.Tensor) -> torch.Tensor:
    """The same, one client at a time: b_p diag(c_p) and a_p through the single-client layer."""
    check_batched_inputs(x, weight, lora_B, lora_A, client_scales)
    return torch.stack([lora_linear_reference(x[p], weight, bias,
                                              lora_B[p] * client_scales[p][None, :], lora_A[p],
                                              None, 1.0)
                        for p in range(x.shape[0])])
