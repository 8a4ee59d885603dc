"""One entry point for the LoRA layer: the fused Triton kernel on CUDA, the reference elsewhere."""

from __future__ import annotations

import torch

from kernels.fused import DTYPES, GEMM_CHOICES, check_lora_inputs, lora_linear_triton
from kernels.matmul import INTERPRET
from kernels.reference import lora_linear_reference

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str, gemm: str, device: torch.device | None = None) -> None:
    """Raise ValueError naming a bad `backend` or `gemm`, or a forced Triton on a CPU `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if gemm not in GEMM_CHOICES:
        raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {gemm!r}")
    if backend == "triton" and device is not None and device.type != "cuda" and not INTERPRET:
        raise ValueError(f"backend='triton' on device {str(device)!r} needs CUDA, or "
                         "TRITON_INTERPRET=1 set before triton is first imported")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_B: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor | None,
                client_scale: float, backend: str = "auto", check_index: bool = True,
                gemm: str = "pointer") -> torch.Tensor:
    """y = x W0^T + bias + c (x A[I]^T) B[:, I]^T, c = `client_scale` = s r / k;
    backend: 'auto', 'triton' or 'torch'.

    'auto' runs the Triton kernels (kernels/fused.py) on CUDA tensors and the PyTorch reference
    elsewhere; 'triton' forces the kernels (CPU tensors only under TRITON_INTERPRET=1); 'torch'
    forces the reference. `check_index=False` skips the one device sync that checks the index
    set's range and that its ranks are distinct (kernels/fused.py: check_lora_inputs). `gemm` picks the base GEMM of the Triton
    path: 'pointer' (kernels/matmul.py, any layout), 'tma' (kernels/matmul_tma.py, Hopper) or
    'merged' (cuBLAS on the merged weight W0 + c B[:, I] A[I]).
    """
    check_backend(backend, gemm)
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda)
    # the reference also takes float64 (tests, theory); the kernels take the training dtypes
    check_lora_inputs(x, weight, bias, lora_B, lora_A, index, client_scale, check_index,
                      DTYPES if use_triton else DTYPES + (torch.float64,))
    if use_triton:
        return lora_linear_triton(x, weight, bias, lora_B, lora_A, index, client_scale, gemm)
    return lora_linear_reference(x, weight, bias, lora_B, lora_A, index, client_scale)
