"""The k-column passes around the fused GEMM: the shrinks, the factor gradients, their sums.

They are the few-FLOP, bandwidth-bound products of the sketched-LoRA linear (kernels/fused.py)
besides its base GEMM (kernels/matmul.py).

1. `shrink`: a matmul whose output has only k columns (k = sketch size, <= r), in one launch:

       out (R, k) = scale * P (R, Q) @ V (Q, k),    V[q, l] = F[q, I_l] (a gathered factor)

   The forward's u = c x A[I]^T (R = T tokens, Q = n). FLOPs 2 R Q k; bytes ~ 2 R Q (P, read
   once) + 2 Q k + 2 R k: about k FLOPs per byte, memory-bound. The reduction over Q stays inside
   one program, so the row block shrinks (64, 32, 16 rows) until the row blocks fill the GPU.
   `skinny_partials` is the same kernel for a reduction over tokens (dA[I]^T = x^T g: R = n,
   Q = T), which n / 64 row blocks cannot fill: the tokens are split across programs, each
   writing fp32 partial sums.

2. `shrink_dy`: the backward's LoRA parts in one read of dy. Each dy tile (BLOCK_T, BLOCK_M)
   feeds both products that reduce over it: g = c dy B[:, I] (a sum over m) and
   dB[:, I] = dy^T u (a sum over tokens). A program owns one column block of dy (its rows of
   B[:, I] stay in registers) and a range of tokens; it writes fp32 partials of g per column
   block and of dB per token range. kernels/README.md counts what the partials cost.

3. `reduce_partials`: the fixed-order sum of those partials (s = 0, 1, ...), scaled, cast and
   written into its place: g, or the factor gradient at the sketched ranks I. No float atomics
   anywhere, so the same inputs give the same bits on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.matmul import (INTERPRET, dot_acc, input_precision, k_pad, layout, new_output,
                            num_sms)

# ------------------------------------------------------------------------------------------------
# 1. shrink: out (R, k) = scale * P (R, Q) @ F[:, I] (Q, k), or its split partial sums
# ------------------------------------------------------------------------------------------------

def _skinny_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_Q": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_Q": bq}, num_warps=w, num_stages=s)
            for bq, s, w in ((64, 3, 4), (128, 3, 4), (128, 4, 4), (128, 3, 8))]


def _prune_skinny(configs, named_args, **kwargs):
    """Tune only reductions over at least 2^24 numbers (one compile per config)."""
    return configs if named_args["R"] * named_args["Q"] >= 2 ** 24 else configs[:1]


@triton.autotune(configs=_skinny_configs(), key=["R", "Q", "k", "P_LAYOUT"],
                 prune_configs_by={"early_config_prune": _prune_skinny})
@triton.jit
def _skinny_kernel(
    p_ptr,  # P (R, Q), any strides: x or x^T
    f_ptr,  # factor; V[q, l] = f_ptr[I_l * stride_fl + q * stride_fq]
    idx_ptr,  # (k,) int64 index set I on the device
    out_ptr,  # (SPLIT, R, k): fp32 partial sums, or the result itself when SPLIT = 1
    R, Q, k,  # problem sizes
    q_per_split,  # reduction length per split, a multiple of every BLOCK_Q
    stride_pr, stride_pq,  # P strides (rows, reduction)
    stride_fl, stride_fq,  # factor strides (gathered rank, reduction)
    stride_os, stride_or, stride_ol,  # out strides (split, rows, ranks)
    scale,  # multiplies the result (c, or 1)
    P_LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, K_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_r, pid_s = tl.program_id(0), tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_l = tl.arange(0, K_PAD)
    ranks = tl.load(idx_ptr + offs_l, mask=offs_l < k, other=0)  # (K_PAD,) gathered ranks
    q_lo = pid_s * q_per_split
    q_hi = tl.minimum(Q, q_lo + q_per_split)
    acc = tl.zeros((BLOCK_R, K_PAD), dtype=tl.float32)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        p = tl.load(p_ptr + offs_r[:, None] * stride_pr + offs_q[None, :] * stride_pq,
                    mask=(offs_r[:, None] < R) & (offs_q[None, :] < q_hi), other=0.0)
        v = tl.load(f_ptr + ranks[None, :] * stride_fl + offs_q[:, None] * stride_fq,
                    mask=(offs_q[:, None] < q_hi) & (offs_l[None, :] < k), other=0.0)
        acc = dot_acc(p, v, acc, INPUT_PRECISION, INTERPRET)  # (BLOCK_R, K_PAD)
    out = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_l[None, :] * stride_ol
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty),
             mask=(offs_r[:, None] < R) & (offs_l[None, :] < k))


def _launch_skinny(p: torch.Tensor, factor: torch.Tensor, index: torch.Tensor, rank_dim: int,
                   scale: float, out: torch.Tensor, block_r: int, q_per_split: int) -> None:
    R, Q = p.shape
    k = index.numel()
    _skinny_kernel[(triton.cdiv(R, block_r), out.shape[0])](
        p, factor, index, out, R, Q, k, q_per_split, p.stride(0), p.stride(1),
        factor.stride(rank_dim), factor.stride(1 - rank_dim), out.stride(0), out.stride(1),
        out.stride(2), scale, P_LAYOUT=layout(p), BLOCK_R=block_r, K_PAD=k_pad(k),
        INPUT_PRECISION=input_precision(p.dtype), INTERPRET=INTERPRET)


def shrink(p: torch.Tensor, factor: torch.Tensor, index: torch.Tensor, rank_dim: int,
           scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """scale * P @ F[:, I] as an (R, k) tensor in one launch; `rank_dim` is the dimension of
    `factor` that I indexes (0 for A (r, n), 1 for B (m, r)), the other one is summed against
    P's columns. The row block is the largest of 64, 32, 16 whose row blocks fill the GPU."""
    R, Q = p.shape
    sms = num_sms(p.device)
    block_r = 16 if INTERPRET else next((b for b in (64, 32) if triton.cdiv(R, b) >= sms), 16)
    out = new_output((1, R, index.numel()), out_dtype, p.device)
    _launch_skinny(p, factor, index, rank_dim, scale, out, block_r, Q)
    return out[0]


def skinny_partials(p: torch.Tensor, factor: torch.Tensor, index: torch.Tensor, rank_dim: int,
                    split: int | None = None) -> torch.Tensor:
    """P @ F[:, I] as (S, R, k) fp32 partial sums over S splits of the reduction; by default
    enough splits for two waves of programs over the GPU (`reduce_partials` adds them up)."""
    R, Q = p.shape
    block_r, block_q = (16, 16) if INTERPRET else (64, 128)  # block_q: the largest BLOCK_Q
    row_blocks, q_blocks = triton.cdiv(R, block_r), triton.cdiv(Q, block_q)
    if split is None:
        split = triton.cdiv(2 * num_sms(p.device), row_blocks)
    q_per_split = triton.cdiv(q_blocks, max(1, min(split, q_blocks))) * block_q
    out = new_output((triton.cdiv(Q, q_per_split), R, index.numel()), torch.float32, p.device)
    _launch_skinny(p, factor, index, rank_dim, 1.0, out, block_r, q_per_split)
    return out


# ------------------------------------------------------------------------------------------------
# 2. the backward's one read of dy for the LoRA parts: g = c dy B[:, I] and dB[:, I] = dy^T u
# ------------------------------------------------------------------------------------------------

@triton.jit
def _shrink_dy_kernel(
    dy_ptr,  # dy (T, M), any strides
    f_ptr,  # B (M, r); its gathered columns B[:, I]
    idx_ptr,  # (k,) int64 index set I
    u_ptr,  # u (T, k) = c x A[I]^T, read only when GRAD_B
    g_ptr,  # (M / BLOCK_M, T, k) fp32: g's partial sum over each column block of dy
    part_ptr,  # (SPLIT, M, k) fp32: dB[:, I]'s partial sum over each token range
    T, M, k, t_per_split,  # sizes; tokens per split, a multiple of BLOCK_T
    stride_dt, stride_dm, stride_fm, stride_fl, stride_ut, stride_ul,
    stride_gs, stride_gt, stride_gl, stride_ps, stride_pm, stride_pl,
    GRAD_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, K_PAD)
    in_m, in_l = offs_m < M, offs_l < k
    ranks = tl.load(idx_ptr + offs_l, mask=in_l, other=0)
    b = tl.load(f_ptr + offs_m[:, None] * stride_fm + ranks[None, :] * stride_fl,
                mask=in_m[:, None] & in_l[None, :], other=0.0)  # (BLOCK_M, K_PAD), kept
    db = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    t_lo = pid_s * t_per_split
    t_hi = tl.minimum(T, t_lo + t_per_split)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < t_hi
        dy = tl.load(dy_ptr + offs_t[:, None] * stride_dt + offs_m[None, :] * stride_dm,
                     mask=in_t[:, None] & in_m[None, :], other=0.0)  # (BLOCK_T, BLOCK_M)
        g = dot_acc(dy, b, tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32), INPUT_PRECISION,
                    INTERPRET)
        tl.store(g_ptr + pid_m * stride_gs + offs_t[:, None] * stride_gt
                 + offs_l[None, :] * stride_gl, g, mask=in_t[:, None] & in_l[None, :])
        if GRAD_B:
            u = tl.load(u_ptr + offs_t[:, None] * stride_ut + offs_l[None, :] * stride_ul,
                        mask=in_t[:, None] & in_l[None, :], other=0.0)  # (BLOCK_T, K_PAD)
            db = dot_acc(tl.trans(dy), u, db, INPUT_PRECISION, INTERPRET)
    if GRAD_B:
        tl.store(part_ptr + pid_s * stride_ps + offs_m[:, None] * stride_pm
                 + offs_l[None, :] * stride_pl, db, mask=in_m[:, None] & in_l[None, :])


def shrink_dy(dy: torch.Tensor, lora_B: torch.Tensor, index: torch.Tensor, client_scale: float,
              u: torch.Tensor | None, split: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """g = client_scale * dy B[:, I] (T, k) in dy's dtype and, given u, dB[:, I] = dy^T u as
    (S, m, k) fp32 partial sums over S token ranges (`reduce_partials` adds them up); dy is read
    once for both. By default enough token ranges for two waves of programs over the GPU."""
    T, M = dy.shape
    k = index.numel()
    # 256 columns: half the g partials of 128 (in fp32, 128 keeps the tiles in shared memory)
    block_t, block_m = (16, 16) if INTERPRET else (64, 128 if dy.dtype == torch.float32 else 256)
    m_blocks, t_blocks = triton.cdiv(M, block_m), triton.cdiv(T, block_t)
    if split is None:
        split = triton.cdiv(2 * num_sms(dy.device), m_blocks)
    t_per_split = triton.cdiv(t_blocks, max(1, min(split, t_blocks))) * block_t
    split = triton.cdiv(T, t_per_split)
    g_parts = new_output((m_blocks, T, k), torch.float32, dy.device)
    db_parts = new_output((split, M, k), torch.float32, dy.device) if u is not None else g_parts
    u_arg = u if u is not None else g_parts  # never read without GRAD_B
    _shrink_dy_kernel[(m_blocks, split)](
        dy, lora_B, index, u_arg, g_parts, db_parts, T, M, k, t_per_split,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), u_arg.stride(0),
        u_arg.stride(1), *g_parts.stride(), *db_parts.stride(), GRAD_B=u is not None,
        BLOCK_T=block_t, BLOCK_M=block_m, K_PAD=k_pad(k), INPUT_PRECISION=input_precision(dy.dtype),
        INTERPRET=INTERPRET, num_warps=1 if INTERPRET else 8)
    g = reduce_partials(g_parts, client_scale, new_output((T, k), dy.dtype, dy.device), 1)
    return g, (db_parts if u is not None else None)


# ------------------------------------------------------------------------------------------------
# 3. the partial sums, added up in a fixed order, scaled, cast and put in place
# ------------------------------------------------------------------------------------------------

@triton.jit
def _reduce_kernel(
    part_ptr,  # (S, R, k) fp32 partial sums
    idx_ptr,  # (k,) int64: the output rank of each column, read only when SCATTER
    out_ptr,  # out[row, rank] at row * stride_or + rank * stride_ol
    S, R, k, stride_ps, stride_pr, stride_pl, stride_or, stride_ol,
    scale,
    SCATTER: tl.constexpr, BLOCK_R: tl.constexpr, K_PAD: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_l = tl.arange(0, K_PAD)
    mask = (offs_r[:, None] < R) & (offs_l[None, :] < k)
    tile = offs_r[:, None] * stride_pr + offs_l[None, :] * stride_pl
    acc = tl.zeros((BLOCK_R, K_PAD), dtype=tl.float32)
    for s in range(0, S):  # s = 0, 1, ...: the same order, the same bits, every run
        acc += tl.load(part_ptr + s * stride_ps + tile, mask=mask, other=0.0)
    ranks = offs_l
    if SCATTER:
        ranks = tl.load(idx_ptr + offs_l, mask=offs_l < k, other=0)
    tl.store(out_ptr + offs_r[:, None] * stride_or + ranks[None, :] * stride_ol,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def reduce_partials(partials: torch.Tensor, scale: float, out: torch.Tensor, rank_dim: int,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """out[..., I_l, ...] = scale * sum_s partials[s, :, l] (one launch), `rank_dim` the
    dimension of the 2-D `out` that holds the ranks; I = 0..k-1 when `index` is None. Returns
    `out`, whose other ranks it leaves as they are."""
    S, R, k = partials.shape
    block_r = 16 if INTERPRET else 64
    _reduce_kernel[(triton.cdiv(R, block_r),)](
        partials, index if index is not None else partials, out, S, R, k, *partials.stride(),
        out.stride(1 - rank_dim), out.stride(rank_dim), scale, SCATTER=index is not None,
        BLOCK_R=block_r, K_PAD=k_pad(k), num_warps=1 if INTERPRET else 4)
    return out
