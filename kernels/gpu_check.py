"""The one command for a GPU machine: `python -m kernels.gpu_check [--dry] [--out JSON]`.

In this order, writing its JSON (a `kernels.bench` run plus the test results and the clocks)
after every step, so a run cut short keeps all it measured:
1. the kernel tests that need a GPU (tests/test_kernels.py's GPU-size and determinism tests),
   compiled, not interpreted;
2. the bench's shapes in decision order (bench.SHAPES: the goal shape, T = 8192, n = m = 4096,
   k = 16; then T = 16384, n = 14336, m = 4096, where the byte counts favour merging; then
   T = 2048, n = 4096, m = 14336; then the rest), every way behind its correctness gate, every
   part timed alone, with the autotuned configs and nvidia-smi's clocks after each shape;
3. the decision the rule makes (kernels/report.py: `decide`), printed.
`python -m kernels.report JSON --readme` then writes the READMEs' tables from the JSON.

It stops starting new shapes once `--budget-s` seconds have passed (default 420, so that an
8-minute slot also covers the start-up). `--dry` runs the same steps end to end on the CPU: the
tests under Triton's interpreter (the GPU-size ones skip), three tiny shapes in the same order,
each timed call run once with a wall clock; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernels import bench, report

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_kernels.py", "-k", "gpu_sizes or deterministic"]
# --dry: the first three decision shapes scaled down (same order, the second with T > 2 m)
DRY_SHAPES = [(64, 32, 32, 4), (96, 48, 16, 4), (16, 16, 48, 4)]


def run_tests(interpret: bool) -> dict:
    """pytest on the GPU kernel tests in a fresh process; its summary line and exit code."""
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *TESTS], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = out.stdout.strip().splitlines() or [""]
    return {"command": "pytest -q " + " ".join(TESTS), "returncode": out.returncode,
            "summary": lines[-1], "tail": "\n".join(lines[-30:]) + out.stderr[-2000:],
            "seconds": time.perf_counter() - start}


def clocks() -> dict:
    """nvidia-smi's clocks, power and temperature now, or why there are none."""
    query = ("clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,"
             "clocks_throttle_reasons.active")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    if out.returncode != 0:
        return {"error": out.stderr.strip() or f"exit code {out.returncode}"}
    return dict(zip(query.split(","), (v.strip() for v in out.stdout.splitlines()[0].split(","))))


def wall_ms(fn, grad_to_none=None) -> float:
    """--dry's timer: one call's wall time (the interpreter is too slow for more)."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def check(dry: bool, path: Path | None, budget_s: float) -> dict:
    """Every step, the JSON written after each; returns the run."""
    start = time.perf_counter()
    device = "cpu" if dry else "cuda"
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    path = path or ROOT / ("runs/gpu_check_dry.json" if dry
                           else f"results/kernels/gpu_check_{name.replace(' ', '_')}.json")
    tests = run_tests(interpret=dry)
    print(f"tests ({tests['seconds']:.0f} s): {tests['summary']}", flush=True)
    shapes = DRY_SHAPES if dry else bench.SHAPES
    if dry:
        ceilings = bench.measure_ceilings(device, 256, 2 ** 20, wall_ms)
        timer, compiled = wall_ms, None
    else:
        ceilings, timer = bench.measure_ceilings(), bench.median_ms
        torch._dynamo.config.cache_size_limit = 64  # one graph per shape and k
        compiled = torch.compile(bench.lora_linear_reference)
    result = bench.new_result(name, ceilings, dry=dry, goal_shape=list(shapes[0]), tests=tests,
                              clocks=[{"when": "start", **clocks()}], skipped_shapes=[])
    bench.write(result, path)
    for T, n, m, k in shapes:
        if time.perf_counter() - start > budget_s:
            result["skipped_shapes"].append([T, n, m, k])
            continue
        row = bench.bench_case(T, n, m, k, ceilings, compiled, list(bench.GEMM_CHOICES),
                               device=device, timer=timer)
        bench.print_row(row)
        result["rows"].append(row)
        result["clocks"].append({"when": f"after T={T} n={n} m={m} k={k}", **clocks()})
        bench.write(result, path)
        if not dry:
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    bench.write(result, path)
    if result["skipped_shapes"]:
        print(f"out of time: skipped {result['skipped_shapes']}")
    print(report.decision_table(result))
    print(f"wrote {path}; then `python -m kernels.report {path} --readme`")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true",
                        help="every step on the CPU at tiny shapes (Triton's interpreter)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: results/kernels/gpu_check_<device>.json, or "
                             "runs/gpu_check_dry.json with --dry)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new shape after this many seconds (default: 420)")
    args = parser.parse_args()
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry to check the steps on the CPU")
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        # triton read it when this module imported `kernels`: start again with it set
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "kernels.gpu_check", *sys.argv[1:]], env)
    result = check(args.dry, args.out, args.budget_s)
    failed = bench.failed_ways(result)
    if result["tests"]["returncode"] != 0 or failed:
        raise SystemExit(f"FAILED: tests exit code {result['tests']['returncode']}, ways {failed}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
