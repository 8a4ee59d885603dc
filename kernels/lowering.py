"""What the kernels compile to for a Hopper GPU, on any machine: `python -m kernels.lowering`.

Triton compiles ahead of time for a named target (here CUDA compute capability 9.0, the H100)
with its own bundled ptxas, so no GPU is needed to see what the GPU would run. For every
autotuning config that the autotuner would try for each kernel launch of the fused layer
(forward and backward layouts) at a given shape and dtype (default: the benchmark's, bf16,
T = 8192, n = m = 4096, k = 16), this reports:

- the tensor-core instruction: `wgmma` (Hopper's warpgroup MMA, the fast path), `mma.sync`
  (the older per-warp MMA, about half of Hopper's rate at best) or none (FMA);
- TMA bulk copies (`cp.async.bulk.tensor`) against per-thread async copies (`cp.async`);
- shared memory per program against the H100's 227 KiB, registers per thread and local-memory
  bytes (spills: registers that did not fit, a classic slowdown).

It compiles exactly what the JIT would for those arguments: the wrappers (fused_linear, ...) run
on CPU tensors with the launch captured, and the captured arguments go through Triton's own
binder and `triton.compile` (Triton internals: checked with Triton 3.6 and 3.9).
Speed is still only measured on a GPU (kernels/bench.py); this says what code it runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import create_function_from_signature

from kernels import matmul, matmul_tma, skinny

H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90


@dataclass
class Lowering:
    kernel: str
    layout: str  # which call: forward or backward operands
    config: str  # the autotuner config
    tensor_cores: str  # "wgmma", "mma.sync" or "none"
    tma_copies: int  # cp.async.bulk.tensor instructions in the PTX
    async_copies: int  # cp.async (per-thread) instructions in the PTX
    shared_bytes: int
    registers: int
    local_bytes: int  # > 0: spilled registers


class _Captured(Exception):
    """Stops the wrapper at its launch of the kernel: what it would do next runs no kernel."""


def capture_launch(kernel, call) -> tuple[tuple, dict]:
    """Run `call()` up to its launch of `kernel`, the launch replaced by a recorder."""
    seen = {}

    def record(*args, grid, warmup, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise _Captured

    kernel.run = record  # the instance attribute shadows the class's run
    try:
        call()
    except _Captured:
        pass
    finally:
        del kernel.run
    return seen["args"], seen["kwargs"]


def compile_config(kernel, args: tuple, kwargs: dict, config: triton.Config, target: GPUTarget):
    """triton.compile of `kernel` (autotuned or not) for `target` with one config, as the JIT
    would specialise it."""
    named = dict(zip(kernel.arg_names, args))
    kwargs = {**kwargs, **{key: v for key, v in config.all_kwargs().items() if v is not None}}
    if config.pre_hook:
        config.pre_hook({**named, **kwargs})
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    while isinstance(fn, Heuristics):
        kwargs.update({key: rule({**named, **kwargs}) for key, rule in fn.values.items()})
        fn = fn.fn
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes) from the bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return int(regs.group(1)), int(local.group(1))


def summarize(compiled, kernel: str, layout: str, config: triton.Config) -> Lowering:
    """What one compiled config runs on: tensor cores, copies, shared memory, registers."""
    ptx = compiled.asm["ptx"]
    cores = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    registers, local = resource_usage(compiled.asm["cubin"])
    tile = ",".join(f"{key}={v}" for key, v in config.kwargs.items())
    return Lowering(kernel, layout, f"{tile} warps={config.num_warps} stages={config.num_stages}",
                    cores, len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                    len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)), compiled.metadata.shared,
                    registers, local)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def launches(T: int, n: int, m: int, k: int, dtype: torch.dtype,
             r: int = 64) -> list[tuple[str, str, object, callable]]:
    """Every kernel launch of the fused layer's forward and backward, on CPU tensors."""
    like = dict(dtype=dtype)
    x, dy, w0 = torch.empty(T, n, **like), torch.empty(T, m, **like), torch.empty(m, n, **like)
    lora_B, lora_A = torch.empty(m, r, **like), torch.empty(r, n, **like)
    u, index = torch.empty(T, k, **like), torch.arange(k)  # index: also the identity 0..k-1
    out = []
    for gemm, kernel in ((matmul.fused_linear, matmul._fused_linear_kernel),
                         (matmul_tma.fused_linear_tma, matmul_tma._fused_linear_tma_kernel)):
        out.append((gemm.__name__, "forward", kernel,
                    lambda g=gemm: g(x, w0.t(), None, u, lora_B, index, 1)))
        out.append((gemm.__name__, "backward dx", kernel,
                    lambda g=gemm: g(dy, w0, None, u, lora_A, index, 0)))
    parts = torch.empty(3, n, k)
    out += [("shrink", "u = c x A[I]^T", skinny._skinny_kernel,
             lambda: skinny.shrink(x, lora_A, index, 0, 0.5, x.dtype)),
            ("skinny_partials", "dA[I]^T = x^T g", skinny._skinny_kernel,
             lambda: skinny.skinny_partials(x.t(), u, index, 1)),
            ("shrink_dy", "g = c dy B[:, I], dy^T u", skinny._shrink_dy_kernel,
             lambda: skinny.shrink_dy(dy, lora_B, index, 0.5, u)),
            ("reduce_partials", "dA[I] from partials", skinny._reduce_kernel,
             lambda: skinny.reduce_partials(parts, 1.0, lora_A, 0, index))]
    return out


def tried_configs(kernel, args: tuple, kwargs: dict) -> list[triton.Config]:
    """The configs the autotuner would try for these arguments (after its early pruning); a
    kernel that is not autotuned has one, its launch's."""
    if not isinstance(kernel, Autotuner):
        tile = {key: v for key, v in kwargs.items() if key.startswith("BLOCK_")}
        return [triton.Config(tile, num_warps=kwargs.pop("num_warps", 4),
                              num_stages=kwargs.pop("num_stages", 3))]
    if kernel.early_config_prune is None:
        return kernel.configs
    return kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs)


def lower_all(T: int = 8192, n: int = 4096, m: int = 4096, k: int = 16, dtype: str = "bf16",
              capability: int = 90) -> list[Lowering]:
    target = GPUTarget("cuda", capability, 32)
    rows = []
    for name, layout, kernel, call in launches(T, n, m, k, DTYPES[dtype]):
        args, kwargs = capture_launch(kernel, call)
        for config in tried_configs(kernel, args, kwargs):
            rows.append(summarize(compile_config(kernel, args, kwargs, config, target), name,
                                 layout, config))
    return rows


def main() -> None:
    if matmul.INTERPRET:  # the kernels were decorated for the interpreter: nothing to compile
        raise SystemExit("kernels.lowering compiles real kernels: run it without "
                         "TRITON_INTERPRET=1 in the environment")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(8192, 4096, 4096, 16),
                        metavar=("T", "n", "m", "k"), help="tokens, in, out features, sketch size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability x10")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = lower_all(*args.shape, dtype=args.dtype, capability=args.capability)
    print(f"triton {triton.__version__}, target sm_{args.capability}, shape "
          f"T n m k = {' '.join(map(str, args.shape))}, {args.dtype}")
    for row in rows:
        fits = "" if row.shared_bytes <= H100_SHARED_BYTES else "  (over 227 KiB)"
        print(f"{row.kernel:17} {row.layout:24} {row.config:58} {row.tensor_cores:8} "
              f"tma {row.tma_copies:3}  cp.async {row.async_copies:3}  "
              f"smem {row.shared_bytes // 1024:3} KiB  regs {row.registers:3}  "
              f"local {row.local_bytes}{fits}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"triton": triton.__version__,
                                         "capability": args.capability, "shape": args.shape,
                                         "dtype": args.dtype,
                                         "shared_limit_bytes": H100_SHARED_BYTES,
                                         "rows": [asdict(r) for r in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
