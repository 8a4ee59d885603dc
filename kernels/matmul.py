"""The Triton kernels behind the fused sketched-LoRA linear (kernels/fused.py).

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
   block and of dB per token range.

3. `reduce_partials`: the fixed-order sum of those partials (s = 0, 1, ...), scaled, cast and
   written into its place: g, or the factor gradient at the sketched ranks I. No float atomics
   anywhere, so the same inputs give the same bits on every run.

4. `fused_linear`: a tiled GEMM whose K loop ends with one extra step over the k sketched ranks:

       y (T, N) = X (T, K) @ W (K, N) + bias + U (T, k) @ L (k, N),   L[l, j] = F[I_l, j]

   Forward: X = x, W = W0^T, U = c x A[I]^T, L = B[:, I]^T.  Backward: X = dy, W = W0,
   U = c dy B[:, I], L = A[I].  FLOPs 2 T K N + 2 T k N; the LoRA step adds k / K to the work
   and no pass over y. Bytes >= 2 (T K + K N + T N): compute-bound at LLM shapes. Its autotune
   key holds the layouts of X and W (and Triton adds the dtypes): the forward of (n, m) and the
   dx of (m, n) have the same sizes but not the same memory access.

All read the index set I from device memory, so a new sketch never recompiles; only the padded
size K_PAD = next power of two >= max(k, 16) is a compile-time constant. Pointer offsets are
int32: every operand must have fewer than 2^31 elements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when the kernels below are decorated, i.e. at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The value every new kernel output starts with; None leaves it uninitialised. The tests set NaN,
# so an element that a kernel never writes fails their comparison.
POISON: float | None = None


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes in full comes from here (filled with POISON when it is set)."""
    if POISON is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, POISON, dtype=dtype, device=device)


def layout(t: torch.Tensor) -> int:
    """A 2-D tensor's memory order, for the autotune keys: 0 row-major, 1 column-major, 2 other."""
    return 0 if t.stride(1) == 1 else 1 if t.stride(0) == 1 else 2


def chosen_config(kernel: triton.runtime.Autotuner) -> str:
    """The config the autotuner ran last for `kernel` (for the bench's record)."""
    c = kernel.best_config
    tile = " ".join(f"{key}={v}" for key, v in c.kwargs.items())
    return f"{tile} warps={c.num_warps} stages={c.num_stages}"


def k_pad(k: int) -> int:
    """Columns of the rank tile: tl.dot needs a power of two >= 16."""
    return max(16, triton.next_power_of_2(k))


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own TF32 switch, so 'triton' and 'torch' agree in fp32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: small, so that small test shapes still split their reductions


@triton.jit
def dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter only): triton 3.9's interpreter mis-multiplies bf16 dots,
    so the operands go to fp32 first; a bf16 x bf16 product is exact in fp32 anyway."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def tile_coords(tile, T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_T: tl.constexpr):
    """(row-block, column-block) of output tile number `tile`, in grouped order: GROUP_T
    row-blocks share each column-block of W while it is in L2."""
    num_t, num_n = tl.cdiv(T, BLOCK_T), tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_T * num_n)
    first_t = group * GROUP_T
    group_size = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (tile % (GROUP_T * num_n)) % group_size
    pid_n = (tile % (GROUP_T * num_n)) // group_size
    return pid_t, pid_n


@triton.jit
def lora_step_and_bias(acc, offs_t, offs_n, T, N, k, u_ptr, stride_ut, stride_ul, f_ptr,
                       stride_fl, stride_fn, idx_ptr, bias_ptr, HAS_BIAS: tl.constexpr,
                       K_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """The end of a fused-linear tile: acc + U[:, :k] F[I, :] (+ bias).

    The LoRA term is one more K_PAD-deep step of the GEMM into the same accumulator, so it
    costs no pass over y; padded ranks l >= k load zeros. L[l, j] = F[I_l, j] is gathered
    through the index set in device memory.
    """
    in_t, in_n = offs_t < T, offs_n < N
    offs_l = tl.arange(0, K_PAD)
    ranks = tl.load(idx_ptr + offs_l, mask=offs_l < k, other=0)  # (K_PAD,)
    u = tl.load(u_ptr + offs_t[:, None] * stride_ut + offs_l[None, :] * stride_ul,
                mask=in_t[:, None] & (offs_l[None, :] < k), other=0.0)  # (BLOCK_T, K_PAD)
    lf = tl.load(f_ptr + ranks[:, None] * stride_fl + offs_n[None, :] * stride_fn,
                 mask=(offs_l[:, None] < k) & in_n[None, :], other=0.0)  # (K_PAD, BLOCK_N)
    acc = dot_acc(u, lf, acc, INPUT_PRECISION, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    return acc


# ------------------------------------------------------------------------------------------------
# 1. skinny matmul: out (R, k) = scale * P (R, Q) @ F[:, I] (Q, k), or its split partial sums
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


# ------------------------------------------------------------------------------------------------
# 4. fused linear: y (T, N) = X (T, K) @ W (K, N) + bias + U (T, k) @ F[I, :] (k, N)
# ------------------------------------------------------------------------------------------------

def gemm_configs(shapes: list[tuple[int, ...]], pre_hook=None) -> list[triton.Config]:
    """One autotuning config per (BLOCK_T, BLOCK_N, BLOCK_K, stages, warps); the first must be
    the one tile for fp32 and for small problems (see `tune_gemm`). The interpreter runs every
    program in Python, so there it is one small tile."""
    if INTERPRET:
        shapes = [(16, 16, 16, 1, 1)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_K": bk,
                           "GROUP_T": 2 if INTERPRET else 8},
                          num_stages=s, num_warps=w, pre_hook=pre_hook)
            for bt, bn, bk, s, w in shapes]


def tune_gemm(configs: list[triton.Config], named_args: dict, dtype: torch.dtype):
    """Tune only 16-bit problems of at least 2^30 multiply-adds: each config costs a compile,
    and fp32 (exact FMA dots) or small problems gain nothing from the large tiles."""
    big = named_args["T"] * named_args["N"] * named_args["K"] >= 2 ** 30
    return configs if big and dtype != torch.float32 else configs[:1]


def _prune_gemm(configs, named_args, **kwargs):
    return tune_gemm(configs, named_args, named_args["x_ptr"].dtype)


@triton.autotune(configs=gemm_configs([(64, 64, 32, 3, 4), (128, 256, 64, 3, 8),
                                        (128, 256, 64, 4, 8), (256, 128, 64, 3, 8),
                                        (128, 128, 64, 4, 4), (128, 128, 128, 3, 8)]),
                 key=["T", "N", "K", "k", "X_LAYOUT", "W_LAYOUT"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _fused_linear_kernel(
    x_ptr,  # X (T, K): x forward, dy backward
    w_ptr,  # W (K, N) by strides: W0^T forward, W0 backward
    bias_ptr,  # (N,) bias, read only when HAS_BIAS
    u_ptr,  # U (T, k): the shrunk activations, c already folded in
    f_ptr,  # factor; L[l, j] = f_ptr[I_l * stride_fl + j * stride_fn]
    idx_ptr,  # (k,) int64 index set I on the device
    y_ptr,  # (T, N) output
    T, N, K, k,  # problem sizes
    stride_xt, stride_xk,  # X strides
    stride_wk, stride_wn,  # W strides
    stride_ut, stride_ul,  # U strides
    stride_fl, stride_fn,  # factor strides (gathered rank, output column)
    stride_yt, stride_yn,  # y strides
    X_LAYOUT: tl.constexpr, W_LAYOUT: tl.constexpr,  # layout(X), layout(W): autotune key only
    HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_t, pid_n = tile_coords(tl.program_id(0), T, N, BLOCK_T, BLOCK_N, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_t, in_n = offs_t < T, offs_n < N  # row/column masks; Triton still vectorises the loads
    x_tile = x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk  # when T, N % 16 = 0
    w_tile = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # Base GEMM: acc = X W over K.
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # K a multiple of BLOCK_K: no K mask in the hot loop
            x = tl.load(x_tile, mask=in_t[:, None], other=0.0)  # (BLOCK_T, BLOCK_K)
            w = tl.load(w_tile, mask=in_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        else:
            x = tl.load(x_tile, mask=in_t[:, None] & (offs_k[None, :] < K - k0), other=0.0)
            w = tl.load(w_tile, mask=(offs_k[:, None] < K - k0) & in_n[None, :], other=0.0)
        acc = dot_acc(x, w, acc, INPUT_PRECISION, INTERPRET)
        x_tile += BLOCK_K * stride_xk
        w_tile += BLOCK_K * stride_wk

    acc = lora_step_and_bias(acc, offs_t, offs_n, T, N, k, u_ptr, stride_ut, stride_ul, f_ptr,
                             stride_fl, stride_fn, idx_ptr, bias_ptr, HAS_BIAS, K_PAD,
                             INPUT_PRECISION, INTERPRET)
    y = y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=in_t[:, None] & in_n[None, :])


def fused_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                 factor: torch.Tensor, index: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """X W + bias + U F[I, :] as a (T, N) tensor in X's dtype; `w` is (K, N) (a view is fine),
    `rank_dim` the dimension of `factor` that I indexes, the other one runs over N."""
    T, K = x.shape
    N = w.shape[1]
    k = index.numel()
    y = new_output((T, N), x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fused_linear_kernel[grid](
        x, w, bias if bias is not None else y, u, factor, index, y, T, N, K, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
        factor.stride(rank_dim), factor.stride(1 - rank_dim), y.stride(0), y.stride(1),
        X_LAYOUT=layout(x), W_LAYOUT=layout(w), HAS_BIAS=bias is not None, K_PAD=k_pad(k), INPUT_PRECISION=input_precision(x.dtype),
        INTERPRET=INTERPRET)
    return y

