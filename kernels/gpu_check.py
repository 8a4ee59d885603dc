"""The one command for a GPU machine: `python -m kernels.gpu_check --out DIR [--dry] [--old OLD]`.

Everything it writes lies under DIR (on a lent machine only that folder comes back):
DIR/gpu_check.json (a `kernels.bench` run plus the tests, the clocks and the decision),
rewritten after every step so a run cut short keeps all it measured; DIR/gpu_check.log, all it
printed; DIR/decision.md, the decision table; DIR/engine/, the engine benchmark's. In order:
1. the kernel tests that need a GPU (tests/test_kernels.py's GPU-size and determinism tests),
   compiled, not interpreted, in a subprocess stopped after `--tests-timeout-s`;
2. with `--old OLD` (a checkout of older code, kernels/README.md), the engine benchmark's host
   path, old vs new, at 16 and 64 clients (`python -m fslora_min.study.bench_engine --host`: operations,
   host syncs and a default round's time), in a subprocess stopped after `--engine-timeout-s`;
3. the bench's shapes in decision order (bench.SHAPES: the goal shape, T = 8192, n = m = 4096,
   k = 16; then T = 16384, n = 14336, m = 4096; then T = 2048, n = 4096, m = 14336; then the
   rest), every way behind its correctness gate (outputs poisoned), every part timed alone,
   with the autotuned configs and nvidia-smi's clocks after each shape;
4. the decision (kernels/report.py: `decide`), printed and written.
`python -m kernels.report DIR/gpu_check.json --readme` then writes the READMEs' tables.

The budget (`--budget-s`, from the start) is checked before every timed call, inside a shape
too: a shape it cuts is listed as skipped and no later one starts. `--no-compile` leaves out
ratio (d), which the decision does not use. `--dry` runs the same steps end to end on the CPU:
the tests under Triton's interpreter (the GPU-size ones skip), three tiny shapes in the same
order, each timed call run once with a wall clock, the engine step (with `--old`) at 2 clients;
its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
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
# the engine step's arguments to `python -m fslora_min.study.bench_engine --host`
ENGINE_ARGS = {False: ["--device", "cuda", "--clients", "16", "64", "--time-clients", "16", "64",
                       "--repeats", "3"],
               True: ["--device", "cpu", "--clients", "2", "--time-clients", "2", "--repeats",
                      "1", "--rank", "4"]}


class Log:
    """Prints and appends to DIR/gpu_check.log, so the log comes back with the JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")


def run_tests(interpret: bool, timeout_s: float) -> dict:
    """pytest on the GPU kernel tests in a fresh process; its summary line and exit code
    ("timeout" when it ran past `timeout_s` and was stopped)."""
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    return subprocess_step([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *TESTS], env, timeout_s, "pytest -q " + " ".join(TESTS))


def run_engine(old: Path, out: Path, dry: bool, timeout_s: float) -> dict:
    """The engine benchmark's host path, old vs new, writing under `out`."""
    cmd = [sys.executable, "-m", "fslora_min.study.bench_engine", "--host", "--old", str(old),
           "--out", str(out), *ENGINE_ARGS[dry]]
    return subprocess_step(cmd, dict(os.environ), timeout_s, " ".join(cmd[1:]))


def subprocess_step(cmd: list[str], env: dict, timeout_s: float, name: str) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=timeout_s)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as stopped:
        code = "timeout"
        stdout, stderr = (x.decode() if isinstance(x, bytes) else x or ""
                          for x in (stopped.stdout, stopped.stderr))
    lines = stdout.strip().splitlines() or [""]
    return {"command": name, "returncode": code, "summary": lines[-1],
            "tail": "\n".join(lines[-30:]) + stderr[-2000:],
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


def check(dry: bool, out: Path, budget_s: float, compile_d: bool = True,
          old: Path | None = None, tests_timeout_s: float = 150.0,
          engine_timeout_s: float = 200.0) -> dict:
    """Every step, the JSON written after each; returns the run."""
    start = bench.CLOCK()
    deadline = start + budget_s
    device = "cpu" if dry else "cuda"
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    path, log = out / "gpu_check.json", Log(out / "gpu_check.log")
    shapes = DRY_SHAPES if dry else bench.SHAPES
    result = bench.new_result(name, {}, dry=dry, goal_shape=list(shapes[0]), tests=None,
                              engine=None, clocks=[{"when": "start", **clocks()}],
                              skipped_shapes=[])
    bench.write(result, path)
    result["tests"] = run_tests(dry, tests_timeout_s)
    log(f"tests ({result['tests']['seconds']:.0f} s): {result['tests']['summary']}")
    bench.write(result, path)
    if old is not None:
        result["engine"] = run_engine(old, out / "engine", dry, engine_timeout_s)
        log(f"engine ({result['engine']['seconds']:.0f} s, exit {result['engine']['returncode']}):"
            f"\n{result['engine']['tail']}")
        bench.write(result, path)
    if dry:
        result["ceilings"] = bench.measure_ceilings(device, 256, 2 ** 20, wall_ms)
        timer, compiled = wall_ms, None
    else:
        result["ceilings"], timer = bench.measure_ceilings(), bench.median_ms
        torch._dynamo.config.cache_size_limit = 64  # one graph per shape and k
        compiled = torch.compile(bench.lora_linear_reference) if compile_d else None
    timer = bench.budgeted(timer, deadline)
    for T, n, m, k in shapes:
        try:
            if bench.CLOCK() > deadline:
                raise bench.OutOfTime("the budget ran out")
            row = bench.bench_case(T, n, m, k, result["ceilings"], compiled,
                                   list(bench.GEMM_CHOICES), device=device, timer=timer)
        except bench.OutOfTime:
            result["skipped_shapes"].append([T, n, m, k])
            continue
        bench.print_row(row, log)
        result["rows"].append(row)
        result["clocks"].append({"when": f"after T={T} n={n} m={m} k={k}", **clocks()})
        bench.write(result, path)
        if not dry:
            torch.cuda.empty_cache()
    result["seconds"] = bench.CLOCK() - start
    if result["skipped_shapes"]:
        log(f"out of time: skipped {result['skipped_shapes']}")
    result["decision"] = report.decide(result)
    bench.write(result, path)
    table = report.decision_table(result)
    (out / "decision.md").write_text(table + "\n")
    log(table)
    log(f"wrote {path}, {out / 'decision.md'}; then `python -m kernels.report {path} --readme`")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true",
                        help="every step on the CPU at tiny shapes (Triton's interpreter)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the folder for the JSON, the log, the decision and the engine's")
    parser.add_argument("--old", type=Path, default=None,
                        help="a checkout of the old code: adds the engine step (old vs new)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop timing after this many seconds from the start, inside a "
                             "shape too (default: 480)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out ratio (d) (torch.compile of the eager path)")
    parser.add_argument("--tests-timeout-s", type=float, default=150.0)
    parser.add_argument("--engine-timeout-s", type=float, default=200.0)
    args = parser.parse_args()
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry to check the steps on the CPU")
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        # triton read it when this module imported `kernels`: start again with it set
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "kernels.gpu_check", *sys.argv[1:]], env)
    result = check(args.dry, args.out, args.budget_s, not args.no_compile, args.old,
                   args.tests_timeout_s, args.engine_timeout_s)
    failed = bench.failed_ways(result)
    steps = [s for s in ("tests", "engine") if result[s] and result[s]["returncode"] != 0]
    if steps or failed:
        raise SystemExit(f"FAILED: steps {steps}, ways {failed} (see {args.out})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
