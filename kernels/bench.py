"""Benchmark of the fused sketched-LoRA linear: `python -m kernels.bench [--quick]`.

On a GPU, for bf16 x (T, n), W0 (m, n), r = 64 global ranks and a sketch of k, after a
correctness gate at the benchmark's own shapes, medians of `triton.testing.do_bench` for:
    (a) fused forward / F.linear (cuBLAS, no LoRA)                              goal <= 1.12
    (b) fused fwd+bwd / (base forward + base input-gradient)                    goal <= 1.15
    (c) eager gather-based LoRA fwd+bwd (kernels/reference.py) / fused fwd+bwd  goal >= 1.25
    (d) torch.compile of that eager version / fused fwd+bwd                     goal >= 1.0
with useful TFLOP/s, and their share of this GPU's own GEMM rate and copy bandwidth, both
measured in the same run. "Fused" is each `--gemm` way in turn (kernels/fused.py; for
'merged' the LoRA term rides in the merged weight). Where the time goes: the base
input-gradient GEMM alone, each LoRA pass (the shrink, the one read of dy for g and dB, the dA
pass, dB's reduce), and each way's own GEMM in both layouts (or its merge), every one timed
alone at every shape, with the config the autotuner chose for each. Useful FLOPs: forward
2 T n m + 2 T k (n + m); fwd+bwd 4 T n m + 6 T k (n + m). Bytes: each input read once and each
output written once. Writes every figure to results/kernels/bench_<gpu>.json. Without a GPU it
times the reference at a small shape on the CPU and says that the GPU figures are missing.
`python -m kernels.gpu_check` runs the GPU tests and this bench's shapes in the order that
decides the default way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernels import matmul, matmul_tma
from kernels.dispatch import lora_linear
from kernels.fused import GEMM_CHOICES, GEMMS, factor_grad, merged_weight
from kernels.matmul import _fused_linear_kernel, chosen_config
from kernels.skinny import _skinny_kernel, shrink, shrink_dy, skinny_partials
from kernels.reference import lora_linear_reference
from kernels.report import goal_ranges

R = 64  # global rank
# The shapes (T, n, m, k), in the order that decides the default way (kernels/README.md): the
# goal shape first, then one where the byte counts favour merging (T > 2 m), then the one with the
# slowest backward so far, then the rest of the grid.
SHAPES = [(8192, 4096, 4096, 16), (16384, 14336, 4096, 16), (2048, 4096, 14336, 16),
          (8192, 4096, 4096, 8), (8192, 4096, 4096, 32), (8192, 4096, 4096, 64),
          (2048, 14336, 4096, 16), (16384, 4096, 14336, 16)]
QUICK_SHAPES = [(8192, 4096, 4096, 16), (2048, 4096, 14336, 16), (8192, 4096, 4096, 64),
                (2048, 14336, 4096, 16)]
GOALS = {"a_fwd_over_base": ("<=", 1.12), "b_fwdbwd_over_base": ("<=", 1.15),
         "c_eager_over_fused": (">=", 1.25), "d_compiled_over_fused": (">=", 1.0)}


def flops(T: int, n: int, m: int, k: int, backward: bool) -> int:
    if backward:
        return 4 * T * n * m + 6 * T * k * (n + m)
    return 2 * T * n * m + 2 * T * k * (n + m)


def min_bytes(T: int, n: int, m: int, k: int, backward: bool) -> int:
    """bf16 bytes with each input read once, each output written once (the index set aside)."""
    fwd = 2 * (T * n + m * n + k * (m + n) + T * m)  # x, W0, B[:, I], A[I] in; y out
    bwd = 2 * (T * m + m * n + 2 * T * n + 2 * k * (m + n))  # dy, W0, x, factors in; dx, grads out
    return fwd + bwd if backward else fwd


def median_ms(fn, grad_to_none=None) -> float:
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


# The fused GEMM kernel of each Triton way, for the config its autotuner chose.
GEMM_KERNELS = {"pointer": _fused_linear_kernel, "tma": matmul_tma._fused_linear_tma_kernel}


def measure_ceilings(device: str = "cuda", size: int = 8192, copy_numbers: int = 2 ** 28,
                     timer=median_ms) -> dict:
    """This device's own bf16 GEMM rate (size^3, random data) and copy bandwidth (1 GiB)."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    gemm_ms = timer(lambda: a @ b)
    src = torch.randn(copy_numbers, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    return {"gemm_tflops": 2 * size ** 3 / gemm_ms / 1e9, "gemm_size": size,
            "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6}  # read + write


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_case(T: int, n: int, m: int, k: int, ceilings: dict, compiled, gemms: list[str],
               device: str = "cuda", timer=median_ms) -> dict:
    """One shape: the baselines and the LoRA passes once, then the fused path each way; `timer`
    gives a callable's time in ms."""
    g = torch.Generator(device=device).manual_seed(T + n + m + k)

    def rand(*shape, std=1.0):
        return (std * torch.randn(*shape, device=device, generator=g)).to(torch.bfloat16)

    x, w0, dy = rand(T, n), rand(m, n, std=n ** -0.5), rand(T, m)
    lora_B, lora_A = rand(m, R, std=0.1), rand(R, n, std=n ** -0.5)
    index = torch.randperm(R, device=device, generator=g)[:k]
    client_scale = 16.0 / k  # c = s r / k with s = alpha / r, alpha = 16
    leaves = [t.clone().requires_grad_() for t in (x, lora_B, lora_A)]
    args = (leaves[0], w0, None, leaves[1], leaves[2], index, client_scale)

    def fwd_bwd(fn, *fn_args):
        return lambda: fn(*fn_args).backward(dy)

    t, configs = {}, {}
    with torch.no_grad():
        t["base_fwd"] = timer(lambda: F.linear(x, w0))
        t["base_dx"] = timer(lambda: dy @ w0)  # the base input-gradient GEMM alone
    t["base_fwdbwd"] = timer(fwd_bwd(F.linear, leaves[0], w0), grad_to_none=leaves)
    t["eager_fwdbwd"] = timer(fwd_bwd(lora_linear_reference, *args), grad_to_none=leaves)
    if compiled is not None:
        t["compiled_fwdbwd"] = timer(fwd_bwd(compiled, *args), grad_to_none=leaves)
    # Where the time goes besides the GEMMs: the LoRA passes, the same whichever way the base
    # GEMM runs (the GEMMs' own times are taken per way, in bench_fused).
    u = shrink(x, lora_A, index, 0, client_scale, x.dtype)  # (T, k) = c x A[I]^T
    g, dB_parts = shrink_dy(dy, lora_B, index, client_scale, u)  # c dy B[:, I]; dy^T u partials
    ranks = torch.arange(k, device=device)
    t["part_shrink"] = timer(lambda: shrink(x, lora_A, index, 0, client_scale, x.dtype))
    configs["shrink"] = chosen_config(_skinny_kernel)
    t["part_shrink_dy"] = timer(lambda: shrink_dy(dy, lora_B, index, client_scale, u))
    t["part_grad_A"] = timer(lambda: factor_grad(skinny_partials(x.t(), g, ranks, 1), lora_A, 0,
                                                 index))
    configs["grad_A"] = chosen_config(_skinny_kernel)
    t["part_grad_B"] = timer(lambda: factor_grad(dB_parts, lora_B, 1, index))

    # The correctness gate's judge, the same for every GEMM: fp32 on the same bf16 inputs.
    ref = [v.float().requires_grad_() for v in (x, lora_B, lora_A)]
    y_ref = lora_linear_reference(ref[0], w0.float(), None, ref[1], ref[2], index, client_scale)
    y_ref.backward(dy.float())
    judge = {"y": y_ref.detach(), "dx": ref[0].grad, "dB": ref[1].grad, "dA": ref[2].grad}
    del ref, y_ref

    row = {"T": T, "n": n, "m": m, "r": R, "k": k, "ms": t, "configs": configs, "fused": {}}
    for gemm in gemms:
        try:
            row["fused"][gemm] = bench_fused(gemm, args, dy, judge, t, ceilings, u, g, timer)
        except OutOfTime:
            raise
        except Exception as error:  # failed to compile, launch or pass its gate: say so, go on
            row["fused"][gemm] = {"error": f"{type(error).__name__}: {error}"}
    return row


class GateFailed(Exception):
    """The fused path's output or gradients are off the fp32 reference at the bench's shape."""


class OutOfTime(Exception):
    """The time budget ran out before a timed call (`budgeted`)."""


CLOCK = time.perf_counter  # the budget's clock (seconds)


def budgeted(timer, deadline: float):
    """`timer` that first checks the budget (a CLOCK() deadline), so that a shape stops at its
    next timed call, not at its end."""
    def timed(fn, grad_to_none=None) -> float:
        if CLOCK() > deadline:
            raise OutOfTime("the budget ran out")
        return timer(fn, grad_to_none=grad_to_none)
    return timed


@contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every buffer a Triton kernel writes in full starts as NaN (kernels/matmul.py POISON):
    a tile the kernel never writes fails the gate instead of showing an earlier call's y."""
    saved, matmul.POISON = matmul.POISON, float("nan")
    try:
        yield
    finally:
        matmul.POISON = saved


def bench_fused(gemm: str, args: tuple, dy: torch.Tensor, judge: dict, base: dict,
                ceilings: dict, u: torch.Tensor, g: torch.Tensor, timer=median_ms) -> dict:
    """The fused path one way: correctness gate against `judge`, times, ratios (a)-(d), and
    the fused GEMM's own time in each layout with its autotuned config, given the shrunk x (u)
    and dy (g); for 'merged', the merge's."""
    x, w0, _, lora_B, lora_A, index, client_scale = args
    leaves = [x, lora_B, lora_A]
    T, n, m, k = x.shape[0], x.shape[1], w0.shape[0], index.numel()

    def fused(check_index=True):
        return lora_linear(*args, backend="triton", check_index=check_index, gemm=gemm)

    # Correctness gate at these shapes: fused bf16 vs the fp32 judge, on poisoned outputs.
    for leaf in leaves:
        leaf.grad = None
    with poisoned_outputs():
        y = fused()
        y.backward(dy)
    errors = {"y": rel_err(y, judge["y"])}
    errors.update({f"d{name}": rel_err(leaf.grad, judge[f"d{name}"])
                   for name, leaf in zip(("x", "B", "A"), leaves)})
    del y
    if not all(e < 2e-2 for e in errors.values()):
        raise GateFailed(f"correctness gate failed for gemm={gemm} at T={T} n={n} m={m} k={k}: "
                         f"{errors}")

    with torch.no_grad():
        t = {"fused_fwd": timer(lambda: fused(False))}
    t["fused_fwdbwd"] = timer(lambda: fused(False).backward(dy), grad_to_none=leaves)
    t["fused_fwdbwd_checked"] = timer(lambda: fused(True).backward(dy), grad_to_none=leaves)
    configs = {}
    if gemm == "merged":
        t["part_merge"] = timer(lambda: merged_weight(w0, lora_B.detach(), lora_A.detach(),
                                                      index, client_scale))
    else:
        gemm_fn, xd = GEMMS[gemm], x.detach()
        t["part_fused_gemm"] = timer(lambda: gemm_fn(xd, w0.t(), None, u, lora_B, index, 1))
        configs["gemm_fwd"] = chosen_config(GEMM_KERNELS[gemm])
        t["part_fused_gemm_dx"] = timer(lambda: gemm_fn(dy, w0, None, g, lora_A, index, 0))
        configs["gemm_dx"] = chosen_config(GEMM_KERNELS[gemm])

    out = {"ms": t, "configs": configs, "rel_err_vs_fp32": errors,
           "a_fwd_over_base": t["fused_fwd"] / base["base_fwd"],
           "b_fwdbwd_over_base": t["fused_fwdbwd"] / base["base_fwdbwd"],
           "c_eager_over_fused": base["eager_fwdbwd"] / t["fused_fwdbwd"]}
    if "compiled_fwdbwd" in base:
        out["d_compiled_over_fused"] = base["compiled_fwdbwd"] / t["fused_fwdbwd"]
    for name, backward in (("fused_fwd", False), ("fused_fwdbwd", True)):
        tflops = flops(T, n, m, k, backward) / t[name] / 1e9
        gbps = min_bytes(T, n, m, k, backward) / t[name] / 1e6
        out[name] = {"tflops": tflops, "share_gemm_rate": tflops / ceilings["gemm_tflops"],
                     "gbps": gbps, "share_copy_bw": gbps / ceilings["copy_gbps"]}
    return out


def print_row(row: dict, say: Callable[[str], None] = partial(print, flush=True)) -> None:
    for gemm, f in row["fused"].items():
        where = f"T={row['T']:>5} n={row['n']:>5} m={row['m']:>5} k={row['k']:>2} {gemm:>7} | "
        if "error" in f:
            say(f"{where}FAILED: {f['error']}")
            continue
        d = f.get("d_compiled_over_fused", float("nan"))
        say(f"{where}(a) {f['a_fwd_over_base']:.3f} (b) {f['b_fwdbwd_over_base']:.3f} "
            f"(c) {f['c_eager_over_fused']:.3f} (d) {d:.3f} | "
            f"fwd {f['fused_fwd']['tflops']:.0f} TFLOP/s "
            f"({100 * f['fused_fwd']['share_gemm_rate']:.0f}% of GEMM), fwd+bwd "
            f"{f['fused_fwdbwd']['tflops']:.0f} TFLOP/s "
            f"({100 * f['fused_fwdbwd']['share_gemm_rate']:.0f}%)")


def cpu_only(out: Path | None) -> None:
    """No GPU: time the reference at a small shape, say plainly that the GPU figures are missing."""
    T, n, m, k = 512, 256, 256, 16
    x, w0, lora_B, lora_A = (torch.randn(*s) for s in ((T, n), (m, n), (m, R), (R, n)))
    index = torch.randperm(R)[:k]
    times = []
    for _ in range(20):
        start = time.perf_counter()
        lora_linear(x, w0, None, lora_B, lora_A, index, 1.0, backend="auto")
        times.append(time.perf_counter() - start)
    ms = 1e3 * sorted(times)[len(times) // 2]
    note = ("no CUDA GPU here: the GPU figures (a)-(d) are MISSING; only the PyTorch reference "
            "was timed on the CPU (`python -m kernels.lowering` shows, without a GPU, what the "
            "kernels compile to for an H100)")
    print(f"{note}\nreference forward, fp32, T={T} n={n} m={m} r={R} k={k}: {ms:.3f} ms (median)")
    result = {"gpu": None, "note": note, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "triton": triton.__version__,
              "reference_fwd_ms": {"T": T, "n": n, "m": m, "r": R, "k": k, "ms": ms}}
    write(result, out or Path("results/kernels/bench_cpu.json"))


def write(result: dict, path: Path) -> None:
    """Write the JSON whole or not at all (a temporary file renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def new_result(device_name: str, ceilings: dict, **extra) -> dict:
    """A run's header, before its rows: device, versions, ceilings and the goals."""
    return {"gpu": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "dtype": "bfloat16", "ceilings": ceilings,
            "goals": GOALS, **extra, "rows": []}


def failed_ways(result: dict) -> list[str]:
    return sorted({gemm for row in result["rows"] for gemm, f in row["fused"].items()
                   if "error" in f})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="four shapes (QUICK_SHAPES)")
    parser.add_argument("--no-compile", action="store_true", help="skip ratio (d)")
    parser.add_argument("--gemm", nargs="+", choices=GEMM_CHOICES, default=list(GEMM_CHOICES),
                        help="base GEMMs of the fused path to time, side by side (default: all): "
                             "the two Triton kernels with the LoRA step, and 'merged' (cuBLAS on "
                             "W0 + c B[:, I] A[I])")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        return cpu_only(args.out)

    name = torch.cuda.get_device_name()
    torch._dynamo.config.cache_size_limit = 64  # one graph per shape and k
    compiled = None if args.no_compile else torch.compile(lora_linear_reference)
    ceilings = measure_ceilings()
    print(f"{name}: torch {torch.__version__}, triton {triton.__version__}; measured bf16 GEMM "
          f"{ceilings['gemm_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s")
    path = args.out or Path(f"results/kernels/bench_{name.replace(' ', '_')}.json")
    result = new_result(name, ceilings, quick=args.quick)
    for T, n, m, k in QUICK_SHAPES if args.quick else SHAPES:
        row = bench_case(T, n, m, k, ceilings, compiled, args.gemm)
        print_row(row)
        result["rows"].append(row)
        write(result, path)  # after every case: a cut-off run keeps what it measured
        torch.cuda.empty_cache()
    failed = failed_ways(result)
    print(goal_ranges(result))
    print(f"wrote {path}; `python -m kernels.report {path}` prints its tables")
    if failed:
        raise SystemExit(f"FAILED at one shape or more (see above and the JSON): gemm {failed}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
