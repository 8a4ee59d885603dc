"""The fused linear of kernels/matmul.py for Hopper: TMA descriptors and a persistent grid.

Same product, same LoRA step, same result:

    y (T, N) = X (T, K) @ W (K, N) + bias + U (T, k) @ L (k, N),   L[l, j] = F[I_l, j]

What changes is how tiles of X and W reach the tensor cores. `fused_linear` (matmul.py) computes
a pointer for every element of a tile and loads it with `cp.async`; here the host describes X, W
and y once (`TensorDescriptor`: base, shape, strides, tile shape) and each tile is one bulk copy
by Hopper's tensor memory accelerator (TMA), which also zero-fills the ragged edges, so the
K loop carries no masks and no address arithmetic. The grid is persistent: one program per SM
walks the output tiles in the same grouped order, so no program waits to be scheduled and W's
column-blocks stay in L2 across neighbouring tiles.

The LoRA step and the bias are the shared `lora_step_and_bias` (pointer loads: the gather
F[I, :] follows the index set, and U is only (T, k)); they add one K_PAD-deep step to the
K / BLOCK_K steps of the base GEMM.

TMA needs 16-byte aligned rows: X, W and y must have their last stride 1 and every other stride
a multiple of 16 bytes (n and m multiples of 8 in 16-bit types, of 4 in fp32). W0 may be stored
either way round (forward W = W0^T, backward W = W0), so W is described in whichever of its two
layouts is row-major and read transposed when needed (W_NK).

Status: correct under TRITON_INTERPRET=1 and lowered for sm_90 to wgmma + TMA (tests), but not
yet timed on a GPU; kernels/bench.py times it beside the pointer kernel as `--gemm tma`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.matmul import (INTERPRET, dot_acc, gemm_configs, input_precision, k_pad,
                            lora_step_and_bias, new_output, num_sms, tile_coords, tune_gemm)


def _set_tile_shapes(nargs: dict) -> None:
    """The descriptors' tile shapes follow the autotuner's config."""
    bt, bn, bk = nargs["BLOCK_T"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bt, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_NK"] else [bk, bn]
    nargs["y_desc"].block_shape = [bt, bn]


def _prune_tma(configs, named_args, **kwargs):
    return tune_gemm(configs, named_args, named_args["x_desc"].base.dtype)


# (BLOCK_T, BLOCK_N, BLOCK_K, stages, warps): each fits the H100's 227 KiB of shared memory with
# the y tile staged for its TMA store (python -m kernels.lowering checks)
TMA_TILES = [(64, 64, 32, 3, 4), (128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
             (256, 128, 64, 3, 8)]


@triton.autotune(configs=gemm_configs(TMA_TILES, pre_hook=_set_tile_shapes),
                 key=["T", "N", "K", "k", "W_NK"],
                 prune_configs_by={"early_config_prune": _prune_tma})
@triton.jit
def _fused_linear_tma_kernel(
    x_desc,  # X (T, K), tiles (BLOCK_T, BLOCK_K)
    w_desc,  # W (K, N), tiles (BLOCK_K, BLOCK_N); or W^T (N, K), tiles (BLOCK_N, BLOCK_K) if W_NK
    y_desc,  # y (T, N), tiles (BLOCK_T, BLOCK_N)
    bias_ptr, u_ptr, f_ptr, idx_ptr,  # as in matmul._fused_linear_kernel
    T, N, K, k,  # problem sizes
    stride_ut, stride_ul, stride_fl, stride_fn,  # U and factor strides
    n_programs,  # the persistent grid size
    W_NK: tl.constexpr, HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
):
    n_tiles = tl.cdiv(T, BLOCK_T) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_tiles, n_programs):
        pid_t, pid_n = tile_coords(tile, T, N, BLOCK_T, BLOCK_N, GROUP_T)
        t0, n0 = pid_t * BLOCK_T, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # TMA zero-fills past T, N and K: no masks
            x = x_desc.load([t0, k0])  # (BLOCK_T, BLOCK_K)
            if W_NK:
                w = w_desc.load([n0, k0]).T  # (BLOCK_K, BLOCK_N), read transposed
            else:
                w = w_desc.load([k0, n0])
            acc = dot_acc(x, w, acc, INPUT_PRECISION, INTERPRET)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = lora_step_and_bias(acc, offs_t, offs_n, T, N, k, u_ptr, stride_ut, stride_ul, f_ptr,
                                 stride_fl, stride_fn, idx_ptr, bias_ptr, HAS_BIAS, K_PAD,
                                 INPUT_PRECISION, INTERPRET)
        y_desc.store([t0, n0], acc.to(y_desc.dtype))  # TMA clips the ragged edges


def aligned_rows(t: torch.Tensor) -> bool:
    """Whether TMA can describe the 2-D tensor t: last stride 1, rows 16-byte aligned."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 \
        and t.data_ptr() % 16 == 0


def describe(t: torch.Tensor, name: str) -> TensorDescriptor:
    """A TMA descriptor of t (its tile shape is set per autotuner config), or a ValueError."""
    if not aligned_rows(t):
        raise ValueError(f"gemm='tma' needs {name} row-major with rows aligned to 16 bytes; got "
                         f"shape {tuple(t.shape)}, strides {t.stride()}, {t.element_size()}-byte "
                         f"elements: use gemm='pointer'")
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1])


def fused_linear_tma(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     u: torch.Tensor, factor: torch.Tensor, index: torch.Tensor,
                     rank_dim: int) -> torch.Tensor:
    """matmul.fused_linear through TMA descriptors on a persistent grid (same arguments).

    X is copied once if TMA cannot describe it as it is (a strided view, or a view starting off
    the 16-byte grid); W may be row-major either way round. Rows that no copy can align (an odd
    n or m in 16-bit types) raise a ValueError.
    """
    T, K = x.shape
    N = w.shape[1]
    k = index.numel()
    w_nk = not aligned_rows(w)  # then describe W^T (N, K), e.g. W0 itself in the forward
    y = new_output((T, N), x.dtype, x.device)
    if not aligned_rows(x):  # a fresh dense copy: last stride 1, an aligned allocation
        x = x.clone(memory_format=torch.contiguous_format)
    descriptors = (describe(x, "x"), describe(w.t() if w_nk else w, "W0"), describe(y, "y"))
    tiles = lambda meta: triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(N, meta["BLOCK_N"])
    programs = num_sms(x.device)
    _fused_linear_tma_kernel[lambda meta: (min(programs, tiles(meta)),)](
        *descriptors, bias if bias is not None else y, u, factor, index, T, N, K, k,
        u.stride(0), u.stride(1), factor.stride(rank_dim), factor.stride(1 - rank_dim), programs,
        W_NK=w_nk, HAS_BIAS=bias is not None, K_PAD=k_pad(k),
        INPUT_PRECISION=input_precision(x.dtype), INTERPRET=INTERPRET)
    return y
