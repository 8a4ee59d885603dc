"""The fused GEMM of the sketched-LoRA linear (kernels/fused.py), and what every kernel shares.

`fused_linear`: a tiled GEMM whose K loop ends with one extra step over the k sketched ranks:

    y (T, N) = X (T, K) @ W (K, N) + bias + U (T, k) @ L (k, N),   L[l, j] = F[I_l, j]

Forward: X = x, W = W0^T, U = c x A[I]^T, L = B[:, I]^T.  Backward: X = dy, W = W0,
U = c dy B[:, I], L = A[I].  FLOPs 2 T K N + 2 T k N; the LoRA step adds k / K to the work and
no pass over y. Bytes >= 2 (T K + K N + T N): compute-bound at LLM shapes. Its autotune key holds
the layouts of X and W (and Triton adds the dtypes): the forward of (n, m) and the dx of (m, n)
have the same sizes but not the same memory access.

The k-column passes around it (the shrinks, the factor gradients) are in kernels/skinny.py. All
kernels read the index set I from device memory, so a new sketch never recompiles; only the
padded size K_PAD = next power of two >= max(k, 16) is a compile-time constant. Pointer offsets
are int32: every operand must have fewer than 2^31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.inputs import INTERPRET  # read by triton.jit when the kernels below are decorated


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
# fused linear: y (T, N) = X (T, K) @ W (K, N) + bias + U (T, k) @ F[I, :] (k, N)
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
        X_LAYOUT=layout(x), W_LAYOUT=layout(w), HAS_BIAS=bias is not None, K_PAD=k_pad(k),
        INPUT_PRECISION=input_precision(x.dtype),
        INTERPRET=INTERPRET)
    return y

