"""Fused sketched-LoRA linear on the GPU: forward and backward in four Triton launches each way.

What you will learn: how to run a LoRA layer on a sketch of its ranks without ever gathering
B[:, I] or A[I] into new tensors, and why the low-rank term can ride along with the base GEMM.

The math (c = s r / k, I the k sketched ranks out of r, x: (T, n), W0: (m, n)):

    y  = x W0^T + bias + c (x A[I]^T) B[:, I]^T
    dx = dy W0 + c (dy B[:, I]) A[I]         dA[I] = c (dy B[:, I])^T x
    dB[:, I] = c dy^T (x A[I]^T)             (W0 and bias are frozen; other ranks get 0)

Pseudo-code (kernels/matmul.py has the two kernels):

    forward:  u = skinny(x, A[I]^T) * c          (T, k)   "shrink": one read of x
              y = fused(x, W0^T, bias, u, B[:, I]^T)     base GEMM whose K loop ends with one
                                                         extra step u B[:, I]^T into the same
                                                         accumulator: no second pass over y
    backward: g = skinny(dy, B[:, I]) * c        (T, k)   one read of dy
              dx = fused(dy, W0, -, g, A[I])
              dA[I]^T = skinny(x^T, g)           (n, k)   one more read of x
              dB[:, I] = skinny(dy^T, u)         (m, k)   one more read of dy

The gathers happen inside the kernels through the index tensor, so a new sketch each round
costs no recompilation and no copies; the compact form (client-owned b = B[:, I], a = A[I],
index=None) runs the same kernels with I = 0..k-1.

Counts (bf16, 2 bytes per number). Forward: 2 T n m + 2 T k (n + m) FLOPs, the base GEMM plus
k/m + k/n of it; bytes >= 2 (T n + m n + T m) + 2 k (m + n) + 2 T k, plus one more read of x
(2 T n) for the shrink. Backward: 2 T m n + 4 T k (m + n) FLOPs, and besides the base
input-gradient GEMM's traffic, reads of dy and x for the shrink and the two factor gradients
(2 (2 T m + T n) bytes). At T = 8192, n = m = 4096, k = 64 the GEMMs do about 1600 FLOPs per
byte (compute-bound on an H100); the three skinny passes do about k FLOPs per byte
(bandwidth-bound): their 3 x 64 MiB of reads are the overhead over the plain linear.

The other way: merge, then run the plain linear (gemm="merged"). W = W0 + c B[:, I] A[I] is one
cuBLAS addmm (2 m n k FLOPs, one read of W0 and one write of W: 4 m n bytes in bf16), then
y = x W^T + bias and dx = dy W are cuBLAS GEMMs with no LoRA term left in them. The backward
merges again (no (m, n) tensor is kept between the passes) and runs four skinny passes: g, dA, dB
and u, which the merged forward never needed. Which way is cheaper, at a GEMM rate F and a
bandwidth BW (their ratio, the ridge, is 736 / 3.0 = 245 FLOP per byte on an H100), over the
base GEMM's 2 T n m FLOPs and with both GEMMs at the same rate:

    fused forward:  the shrink's read of x, 2 T n bytes:   overhead (F / BW) / m      6% at m = 4096
    merged forward: the merge, 4 m n bytes:                overhead 2 (F / BW) / T    6% at T = 8192

so merging pays when T > 2 m (many tokens per call, a narrow output), and above all when the
Triton GEMM is slower than cuBLAS's. These are counts, not timings: kernels/bench.py times both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.matmul import INTERPRET, fused_linear, fused_linear_cublas, skinny_matmul
from kernels.matmul_tma import fused_linear_tma

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The base GEMM with its LoRA step, three ways to the same product: Triton with pointer loads
# (any GPU, any strides), Triton with TMA descriptors on a persistent grid (Hopper, 16-byte
# aligned rows), or cuBLAS for X W with the Triton LoRA term as its C input.
GEMMS = {"pointer": fused_linear, "tma": fused_linear_tma, "cublas": fused_linear_cublas}
# ... or no LoRA step in the GEMM at all: cuBLAS on the merged weight W0 + c B[:, I] A[I].
GEMM_CHOICES = (*GEMMS, "merged")


def check_lora_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_B: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor | None,
                      scale: float, check_index: bool = True,
                      dtypes: tuple[torch.dtype, ...] = DTYPES) -> None:
    """Raise a ValueError that names the bad value unless the inputs describe a valid layer.

    `check_index` reads the index set's min and max back from the device (one sync) so an
    out-of-range rank raises here instead of faulting inside a kernel.
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
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
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
        lo, hi = torch.stack([index.min(), index.max()]).tolist()
        if lo < 0 or hi >= r:
            raise ValueError(f"index out of range [0, {r}): min {lo}, max {hi}")


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for y = x W0^T + bias + c (x A[I]^T) B[:, I]^T on 2-D x (T, n)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_B, lora_A, index, scale, compact, gemm):
        ctx.scale, ctx.compact = scale, compact  # compact: index is 0..k-1, grads not scattered
        ctx.gemm = gemm
        if gemm == "merged":  # no shrink: u is only needed for dB, so the backward makes it
            u = None
            y = F.linear(x, merged_weight(weight, lora_B, lora_A, index, scale), bias)
        else:
            u = skinny_matmul(x, lora_A, index, 0, scale, x.dtype)  # (T, k) = c x A[I]^T
            y = GEMMS[gemm](x, weight.t(), bias, u, lora_B, index, 1)  # (T, m)
        ctx.save_for_backward(x, weight, lora_B, lora_A, index, u)
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: (T, m)
        x, weight, lora_B, lora_A, index, u = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_B, need_A = ctx.needs_input_grad[0], ctx.needs_input_grad[3], \
            ctx.needs_input_grad[4]
        merged = ctx.gemm == "merged"
        dx = dB = dA = None
        if need_A or (need_x and not merged):
            g = skinny_matmul(dy, lora_B, index, 1, scale, dy.dtype)  # (T, k) = c dy B[:, I]
        if need_x and merged:
            dx = dy @ merged_weight(weight, lora_B, lora_A, index, scale)  # (T, n)
        elif need_x:
            dx = GEMMS[ctx.gemm](dy, weight, None, g, lora_A, index, 0)  # (T, n)
        if need_A:
            dA_I = skinny_matmul(x.t(), g, _arange(g), 1, 1.0, lora_A.dtype)  # (n, k)
            dA = _scatter(lora_A, 0, None if ctx.compact else index, dA_I.t())  # (r, n)
        if need_B:
            if u is None:  # the merged forward skipped the shrink
                u = skinny_matmul(x, lora_A, index, 0, scale, x.dtype)  # (T, k) = c x A[I]^T
            dB_I = skinny_matmul(dy.t(), u, _arange(u), 1, 1.0, lora_B.dtype)  # (m, k)
            dB = _scatter(lora_B, 1, None if ctx.compact else index, dB_I)  # (m, r)
        return dx, None, None, dB, dA, None, None, None, None


def merged_weight(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor,
                  index: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + c B[:, I] A[I] (m, n) in W0's dtype: the sketch merged into the frozen weight.

    One cuBLAS addmm (fp32 accumulation, one rounding at the end) on the gathered (m, k) and
    (k, n) factors: 2 m n k FLOPs, one read of W0 and one write of the result.
    """
    return torch.addmm(weight, lora_B.index_select(1, index), lora_A.index_select(0, index),
                       alpha=scale)


def _arange(t: torch.Tensor) -> torch.Tensor:
    """The identity index set 0..k-1 over the columns of an already gathered (T, k) tensor."""
    return torch.arange(t.shape[1], device=t.device)


def _scatter(factor: torch.Tensor, dim: int, index: torch.Tensor | None,
             grad_I: torch.Tensor) -> torch.Tensor:
    """The full-size gradient: grad_I at the sketched ranks, exact zeros elsewhere."""
    if index is None:  # compact form: the factor holds only the k selected ranks
        return grad_I.contiguous()
    return torch.zeros_like(factor).index_add_(dim, index, grad_I)


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_B: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor | None,
                       scale: float, gemm: str = "pointer") -> torch.Tensor:
    """y = x W0^T + bias + scale (x A[I]^T) B[:, I]^T through the Triton kernels, any (..., n) x.

    index=None is the compact form: every column of B / row of A (b (m, k), a (k, n)).
    gemm: 'pointer', 'tma' or 'cublas', the base GEMM with the LoRA step (GEMMS), or 'merged',
    cuBLAS on W0 + scale B[:, I] A[I] (merged_weight).
    W0 and bias are frozen: asking for their gradient raises instead of silently returning none.
    """
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"backend='triton' needs CUDA tensors (x is on {x.device}), or "
                           "TRITON_INTERPRET=1 set before triton is first imported")
    if torch.is_grad_enabled() and (weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        raise ValueError("the Triton LoRA kernel treats weight and bias as frozen, but one of "
                         "them requires grad: freeze it or use backend='torch'")
    compact = index is None
    if compact:
        index = torch.arange(lora_A.shape[0], device=x.device)
    x2 = x.reshape(-1, x.shape[-1])  # (T, n), a view whenever possible
    y = LoRALinearFunction.apply(x2, weight, bias, lora_B, lora_A, index, float(scale), compact,
                                 gemm)
    return y.reshape(*x.shape[:-1], weight.shape[0])

