"""The fused sketched-LoRA linear on the GPU: its autograd.Function and its input checks.

What you will learn: how to run a LoRA layer on a sketch of its ranks without ever gathering
B[:, I] or A[I] into new tensors, why the low-rank term can ride along with the base GEMM, and
why the backward needs to read dy only twice.

The math (c = s r / k, the `client_scale`; I the k sketched ranks out of r; x: (T, n),
W0: (m, n)):

    y  = x W0^T + bias + c (x A[I]^T) B[:, I]^T
    dx = dy W0 + c (dy B[:, I]) A[I]         dA[I] = c (dy B[:, I])^T x
    dB[:, I] = c dy^T (x A[I]^T)             (W0 and bias are frozen; other ranks get 0)

Pseudo-code (kernels/skinny.py and kernels/matmul.py have the kernels):

    forward:  u = c x A[I]^T                  (T, k)  `shrink`: one read of x, one launch
              y = fused(x, W0^T, bias, u, B[:, I]^T)  base GEMM whose K loop ends with one
                                                      extra step u B[:, I]^T into the same
                                                      accumulator: no second pass over y
    backward: g = c dy B[:, I],               (T, k)  `shrink_dy`: one read of dy for both,
              dB[:, I] = dy^T u               (m, k)  as they reduce over the same dy tiles
              dx = fused(dy, W0, -, g, A[I])          the second read of dy
              dA[I]^T = x^T g                 (n, k)  `skinny_partials`: one read of x

So the backward makes three passes over big operands (dy twice, x once), the forward two (x
twice). The sums that cross programs (g over m, dB and dA over tokens) go through fp32 partials
added up in a fixed order (`reduce_partials`): deterministic, no float atomics.

The gathers happen inside the kernels through the index tensor, so a new sketch each round
costs no recompilation and no copies; the compact form (client-owned b = B[:, I], a = A[I],
index=None) runs the same kernels with I = 0..k-1. kernels/README.md counts the FLOPs and bytes
of each pass.

The other way: merge, then run the plain linear (gemm="merged"). W = W0 + c B[:, I] A[I] is one
cuBLAS addmm (2 m n k FLOPs, one read of W0 and one write of W: 4 m n bytes in bf16), then
y = x W^T + bias and dx = dy W are cuBLAS GEMMs with no LoRA term left in them. The backward
merges again (no (m, n) tensor is kept between the passes) and makes u, which the merged forward
never needed, before the same `shrink_dy` and dA passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.inputs import GEMM_CHOICES, INTERPRET
from kernels.matmul import fused_linear, new_output
from kernels.skinny import reduce_partials, shrink, shrink_dy, skinny_partials
from kernels.matmul_tma import fused_linear_tma

# The base GEMM with its LoRA step, two ways to the same product: Triton with pointer loads
# (any GPU, any strides), or Triton with TMA descriptors on a persistent grid (Hopper, 16-byte
# aligned rows).
GEMMS = {"pointer": fused_linear, "tma": fused_linear_tma}
# ... or no LoRA step in the GEMM at all: cuBLAS on the merged weight W0 + c B[:, I] A[I]
# (GEMM_CHOICES, kernels/inputs.py, names all three).
assert GEMM_CHOICES == (*GEMMS, "merged")


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for y = x W0^T + bias + c (x A[I]^T) B[:, I]^T on 2-D x (T, n)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_B, lora_A, index, client_scale, compact, gemm):
        ctx.client_scale, ctx.compact = client_scale, compact  # compact: index is 0..k-1
        ctx.gemm = gemm
        if gemm == "merged":  # no shrink: u is only needed for dB, so the backward makes it
            u = None
            y = F.linear(x, merged_weight(weight, lora_B, lora_A, index, client_scale), bias)
        else:
            u = shrink(x, lora_A, index, 0, client_scale, x.dtype)  # (T, k) = c x A[I]^T
            y = GEMMS[gemm](x, weight.t(), bias, u, lora_B, index, 1)  # (T, m)
        ctx.save_for_backward(x, weight, lora_B, lora_A, index, u)
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: (T, m)
        x, weight, lora_B, lora_A, index, u = ctx.saved_tensors
        c = ctx.client_scale
        need_x, need_B, need_A = ctx.needs_input_grad[0], ctx.needs_input_grad[3], \
            ctx.needs_input_grad[4]
        merged = ctx.gemm == "merged"
        dx = dB = dA = None
        if need_A or need_B or (need_x and not merged):
            if need_B and u is None:  # the merged forward skipped the shrink
                u = shrink(x, lora_A, index, 0, c, x.dtype)  # (T, k) = c x A[I]^T
            g, dB_parts = shrink_dy(dy, lora_B, index, c, u if need_B else None)
        if need_x and merged:
            dx = dy @ merged_weight(weight, lora_B, lora_A, index, c)  # (T, n)
        elif need_x:
            dx = GEMMS[ctx.gemm](dy, weight, None, g, lora_A, index, 0)  # (T, n)
        scattered = None if ctx.compact else index
        if need_A:
            dA_parts = skinny_partials(x.t(), g, torch.arange(g.shape[1], device=g.device), 1)
            dA = factor_grad(dA_parts, lora_A, 0, scattered)  # (r, n) from (n, k) partials
        if need_B:
            dB = factor_grad(dB_parts, lora_B, 1, scattered)  # (m, r)
        return dx, None, None, dB, dA, None, None, None, None


def merged_weight(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor,
                  index: torch.Tensor, client_scale: float) -> torch.Tensor:
    """W0 + c B[:, I] A[I] (m, n) in W0's dtype: the sketch merged into the frozen weight.

    One cuBLAS addmm (fp32 accumulation, one rounding at the end) on the gathered (m, k) and
    (k, n) factors: 2 m n k FLOPs, one read of W0 and one write of the result.
    """
    return torch.addmm(weight, lora_B.index_select(1, index), lora_A.index_select(0, index),
                       alpha=client_scale)


def factor_grad(partials: torch.Tensor, factor: torch.Tensor, rank_dim: int,
                index: torch.Tensor | None) -> torch.Tensor:
    """A factor's gradient from its (S, rows, k) partial sums: in the compact form (index None)
    the factor holds only the k ranks; otherwise the ranks I of a full-size gradient, exact
    zeros elsewhere."""
    if index is None:
        out = new_output(tuple(factor.shape), factor.dtype, factor.device)
    else:
        out = torch.zeros_like(factor)
    return reduce_partials(partials, 1.0, out, rank_dim, index)


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_B: torch.Tensor, lora_A: torch.Tensor, index: torch.Tensor | None,
                       client_scale: float, gemm: str = "pointer") -> torch.Tensor:
    """y = x W0^T + bias + c (x A[I]^T) B[:, I]^T through the Triton kernels, any (..., n) x.

    index=None is the compact form: every column of B / row of A (b (m, k), a (k, n)).
    gemm: 'pointer' or 'tma', the base GEMM with the LoRA step (GEMMS), or 'merged', cuBLAS on
    W0 + c B[:, I] A[I] (merged_weight).
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
    y = LoRALinearFunction.apply(x2, weight, bias, lora_B, lora_A, index, float(client_scale),
                                 compact, gemm)
    return y.reshape(*x.shape[:-1], weight.shape[0])

