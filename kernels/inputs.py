"""What every way of computing the LoRA linear accepts: the backends' GEMM choices and dtypes,
and the input checks. No Triton here: the PyTorch path imports this, and runs where Triton is
absent (Triton publishes Linux wheels only); the kernels are imported where they run."""

from __future__ import annotations

import math
import os

import torch

# triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when kernels/matmul.py is
# first imported: set it before that.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take
# The base GEMM with its LoRA step (kernels/fused.py GEMMS): Triton with pointer loads, Triton
# with TMA descriptors, or no LoRA step in it at all (cuBLAS on the merged weight).
GEMM_CHOICES = ("pointer", "tma", "merged")


def require_triton() -> None:
    """A one-line ValueError where a Triton way is asked for and the triton package is absent."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ValueError("the Triton LoRA kernels need the triton package, which is not "
                         "installed (Linux wheels only): use --lora-backend torch") from None


def check_lora_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_B: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor | None,
                      client_scale: float, check_index: bool = True,
                      dtypes: tuple[torch.dtype, ...] = DTYPES) -> None:
    """Raise a ValueError that names the bad value unless the inputs describe a valid layer.

    `check_index` reads the index set's min, max and number of repeats back from the device
    (one sync) so that an out-of-range rank raises here instead of faulting inside a
    kernel, and a repeated one instead of losing a gradient: the kernels write each rank's
    gradient once, where the reference would add up a repeated rank's.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (m, n), got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"x must have shape (..., n={n}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
    if lora_B.dim() != 2 or lora_A.dim() != 2 or lora_B.shape[0] != m or lora_A.shape[1] != n \
            or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_B must be (m={m}, r) and lora_A (r, n={n}) with one r, got "
                         f"{tuple(lora_B.shape)} and {tuple(lora_A.shape)}")
    r = lora_B.shape[1]
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_B": lora_B, "lora_A": lora_A}
    for name, t in tensors.items():
        if t is not None and t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}, expected one of {dtypes}")
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}: cast them to one")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(client_scale, bool) or not isinstance(client_scale, (int, float)) \
            or not math.isfinite(client_scale):
        raise ValueError(f"client_scale must be a finite number, got {client_scale!r}")
    if index is None:
        return
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} "
                         f"of shape {tuple(index.shape)}")
    if not 1 <= index.numel() <= r:
        raise ValueError(f"index must hold between 1 and r={r} ranks, got {index.numel()}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    if check_index:
        repeats = (index.sort().values.diff() == 0).sum()
        lo, hi, repeats = torch.stack([index.min(), index.max(), repeats]).tolist()
        if lo < 0 or hi >= r:
            raise ValueError(f"index out of range [0, {r}): min {lo}, max {hi}")
        if repeats:
            raise ValueError(f"index must hold distinct ranks, got {index.tolist()}")
