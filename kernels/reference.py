"""Plain PyTorch reference of the masked low-rank linear the Triton kernels fuse.

    y = x W0^T + bias + c * (x A[I]^T) B[:, I]^T        (c = s r / k; I = all ranks if None)

x: (..., n), W0: (m, n), bias: (m,) or None, B: (m, r), A: (r, n), I: (k,) int64 or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_B: torch.Tensor, lora_A: torch.Tensor,
                          index: torch.Tensor | None, client_scale: float) -> torch.Tensor:
    """y = x W0^T + bias + c (x A[I]^T) B[:, I]^T, c = `client_scale`, by gathering the selected
    ranks."""
    if index is not None:
        lora_B, lora_A = lora_B[:, index], lora_A[index]  # (m, k), (k, n)
    return F.linear(x, weight, bias) + client_scale * F.linear(F.linear(x, lora_A), lora_B)
