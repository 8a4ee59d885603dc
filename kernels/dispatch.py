"""One entry point for the LoRA layer: the fused Triton kernel on CUDA, the reference elsewhere.
Triton is imported only when its kernel runs (`lora_linear_triton`)."""

from __future__ import annotations

import torch

from kernels.inputs import DTYPES, GEMM_CHOICES, INTERPRET, check_lora_inputs, require_triton
from kernels.reference import lora_linear_reference

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str, gemm: str, device: torch.device | None = None) -> None:
    """Raise ValueError naming a bad `backend` or `gemm`, a Triton way without the triton
    package, or a forced Triton on a CPU `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if gemm not in GEMM_CHOICES:
        raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {gemm!r}")
    on_cuda = device is not None and device.type == "cuda"
    if backend == "triton" or (backend == "auto" and on_cuda):
        require_triton()
    if backend == "triton" and device is not None and not on_cuda and not INTERPRET:
        raise ValueError(f"backend='triton' on device {str(device)!r} needs CUDA, or "
                         "TRITON_INTERPRET=1 set before triton is first imported")


def lora_linear_triton(*args: object) -> torch.Tensor:
    """kernels/fused.py's `lora_linear_triton`, imported on its first call."""
    try:
        from kernels.fused import lora_linear_triton as fused
    except ImportError:
        require_triton()  # the one-line error when it is triton that is missing
        raise
    return fused(*args)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_B: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor | None,
                client_scale: float, backend: str = "auto", check_index: bool = True,
                gemm: str = "pointer") -> torch.Tensor:
    """y = x W0^T + bias + c (x A[I]^T) B[:, I]^T, c = `client_scale` = s r / k;
    backend: 'auto', 'triton' or 'torch'.

    'auto' runs the Triton kernels (kernels/fused.py) on CUDA tensors and the PyTorch reference
    elsewhere; 'triton' forces the kernels (CPU tensors only under TRITON_INTERPRET=1); 'torch'
    forces the reference. `check_index=False` skips the one device sync that checks the index
    set's range and that its ranks are distinct (kernels/inputs.py: check_lora_inputs). `gemm`
    picks the base GEMM of the Triton path: 'pointer' (kernels/matmul.py, any layout), 'tma'
    (kernels/matmul_tma.py, Hopper) or 'merged' (cuBLAS on the merged weight W0 + c B[:, I] A[I]).
    """
    check_backend(backend, gemm)
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda)
    # the reference also takes float64 (tests, theory); the kernels take the training dtypes
    check_lora_inputs(x, weight, bias, lora_B, lora_A, index, client_scale, check_index,
                      DTYPES if use_triton else DTYPES + (torch.float64,))
    if use_triton:
        return lora_linear_triton(x, weight, bias, lora_B, lora_A, index, client_scale, gemm)
    return lora_linear_reference(x, weight, bias, lora_B, lora_A, index, client_scale)
