"""Benchmark: rounds per second of the batched engine against the sequential loop.

    python -m fslora_min.bench_engine                     # the device in use, 4, 16, 64 clients
    python -m fslora_min.bench_engine --device cpu --clients 4 16 --repeats 3

One federation per (engine, clients) on the default tiny model (ModelConfig(): 4 layers,
d = 128), full participation, r = 16 and the paper's ratios (k_i = 2, 4, 8, 12 in turn), the
default client (H = 10 SGD steps on 16 sequences of 64 tokens). The base is left at its random
init: a round's cost does not depend on the weights. Each timed sample is one `run_round`
(no evaluation); the engines alternate, sample by sample, so drifts of a shared machine hit
both alike; the figure is the median over samples after a warm-up round. Peak memory of a
round, `peak_mib`: on a GPU, torch's peak allocation over all rounds of that (engine, clients)
pair, warm-up included, with both engines' federations held; on the CPU, a fresh
process builds the federation, resets the kernel's peak-resident-memory mark (writing 5 to
/proc/self/clear_refs sets VmHWM to the current VmRSS), plays one round and reads VmHWM: the
set-up's own peak is forgotten, and `round_extra_mib` = `peak_mib` - `rss_before_round_mib`
(Python, torch, the model and the data) is what the round alone added.

The batched engine trains `--clients-per-pass` clients per pass (0: the device's default,
fslora_min/engine.py); the JSON records the number used.

Writes results/engine/bench_<device name>.json and prints the ratios batched / sequential.

    python -m fslora_min.bench_engine --host --old /tmp/old29    # the host path, old vs new

`--host` measures the server's half of a round and the rest of its host work, with the code
of this checkout ("new") and of an older checkout `--old` ("old": the benchmark and
fslora_min/opcount.py are copied into it and run there, each in a process of its own):
- non-view ATen operations and host syncs of one round outside local training, every client in
  one pass (as on a GPU), at 4, 16 and 64 clients: a round of H = 1 local step and one of
  H = 2 differ by exactly one step, so 2 ops(H=1) - ops(H=2) is the round without its steps;
- CPU seconds (time.process_time, one thread) of a round of the default demo (10 clients, the
  paper's ratios, H = 10, the CPU's passes, no evaluation), old and new processes alternating;
  the figure is the ratio of the medians.
It writes results/engine/host.json and the "host" block of results/engine/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fslora_min
from fslora_min.ranks import PAPER_RATIOS, ranks_from_ratios
from fslora_min.client import ClientConfig
from fslora_min.compute import ComputeConfig
from fslora_min.data import DataConfig, make_federated_data
from fslora_min.federation import Federation, FederationConfig
from fslora_min.lora import apply_lora
from fslora_min.model import ModelConfig, Transformer
from fslora_min.opcount import OpCounter
from fslora_min.server import Server, ServerConfig

GOALS = {"cuda": {16: 2.5, 64: 5.0}, "cpu": {4: 1.0, 16: 1.5}}  # rounds/s, batched / sequential
GPU_MEMORY_GOAL_MIB = 4096  # a 64-client federation of the default model
HOST_OPS_BUDGET = 2000  # non-view ATen operations a 64-client round outside local training
HOST_GOALS = {"ops_ratio_64": 20.0, "cpu_ratio": 1.25}  # old / new (issue 29)
DEMO_CLIENTS = 10  # the demo's clients (FederationConfig.num_clients)
ROOT = Path(fslora_min.__file__).resolve().parents[1]
HOST_BLOCK = ("<!-- host:begin -->", "<!-- host:end -->")


@dataclass
class BenchConfig:
    device: str = "auto"
    clients: tuple[int, ...] = (4, 16, 64)
    repeats: int = 5  # timed rounds per (engine, clients); the median is reported
    rank: int = 16
    clients_per_pass: int = 0  # batched engine; 0: the device's default (fslora_min/engine.py)
    out_dir: str = "results/engine"


def build(num_clients: int, engine: str, device: torch.device, rank: int,
          clients_per_pass: int = 0, client: ClientConfig | None = None,
          model_cfg: ModelConfig | None = None, data_cfg: DataConfig | None = None) -> Federation:
    """A full-participation federation of the default tiny model with the paper's ratios."""
    torch.manual_seed(0)
    model = Transformer(model_cfg or ModelConfig())
    apply_lora(model, rank, alpha=2.0 * rank, generator=torch.Generator().manual_seed(0))
    model.to(device)
    fed = FederationConfig(num_clients=num_clients, participants=num_clients, rounds=10**9,
                           eval_every=10**9)
    data = make_federated_data(data_cfg or DataConfig(), num_clients)
    ranks = ranks_from_ratios(list(PAPER_RATIOS), num_clients, rank)
    return Federation(Server(model, ServerConfig()), data, ranks, fed, client or ClientConfig(),
                      compute=ComputeConfig(engine=engine, clients_per_pass=clients_per_pass))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engines(num_clients: int, device: torch.device, cfg: BenchConfig) -> dict:
    """Seconds per round of each engine, alternating; GPU peak memory per engine."""
    feds = {e: build(num_clients, e, device, cfg.rank, cfg.clients_per_pass)
            for e in ("sequential", "batched")}
    seconds: dict[str, list[float]] = {e: [] for e in feds}
    peak: dict[str, int | None] = {e: None for e in feds}
    for t in range(cfg.repeats + 1):  # round 0 warms up (kernel compiles, allocator)
        order = list(feds) if t % 2 == 0 else list(reversed(feds))
        for engine in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            feds[engine].run_round(t + 1)
            sync(device)
            if t > 0:
                seconds[engine].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[engine] = max(peak[engine] or 0, torch.cuda.max_memory_allocated(device))
    out = {}
    for engine in feds:
        median = statistics.median(seconds[engine])
        out[engine] = {"median_s": median, "rounds_per_s": 1 / median,
                       "samples_s": seconds[engine]}
        out[engine] |= ({"peak_mib": peak[engine] / 2**20} if peak[engine] is not None
                        else cpu_peak_mib(num_clients, engine, cfg))
    fed = feds["batched"]
    out["batched"]["clients_per_pass"] = min(fed.clients_per_pass, num_clients)
    return out


def cpu_peak_mib(num_clients: int, engine: str, cfg: BenchConfig) -> dict[str, float]:
    """A fresh process's peak resident memory over one round, and what it held before it."""
    cmd = [sys.executable, "-m", "fslora_min.bench_engine", "--memory-child", engine,
           "--clients", str(num_clients), "--rank", str(cfg.rank), "--device", "cpu",
           "--clients-per-pass", str(cfg.clients_per_pass)]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    found = dict(re.findall(r"(\w+)=([\d.]+)", text))
    peak, before = float(found["peak_mib"]), float(found["rss_before_round_mib"])
    return {"peak_mib": peak, "rss_before_round_mib": before, "round_extra_mib": peak - before}


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def memory_child(num_clients: int, engine: str, rank: int, clients_per_pass: int) -> None:
    fed = build(num_clients, engine, torch.device("cpu"), rank, clients_per_pass)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: forget the set-up's peak
    before = status_kib("VmRSS")
    fed.run_round(1)
    peak = status_kib("VmHWM")
    print(f"peak_mib={peak / 1024:.1f} rss_before_round_mib={before / 1024:.1f}")


def count_round(num_clients: int, local_steps: int, rank: int,
                model_cfg: ModelConfig | None = None) -> dict[str, int]:
    """Operations and host syncs of one CPU round (the second; the first warms up), all clients
    in one pass; enough sequences that no client starts a new epoch in the first 4 steps."""
    client = ClientConfig(local_steps=local_steps)
    fed = build(num_clients, "batched", torch.device("cpu"), rank, num_clients, client,
                model_cfg, DataConfig(train_seqs=5 * client.batch_size))
    fed.run_round(1)
    with OpCounter() as counter:
        fed.run_round(2)
    return {"ops": counter.ops, "syncs": counter.syncs}


def host_round(num_clients: int, rank: int = 16,
               model_cfg: ModelConfig | None = None) -> dict[str, int]:
    """A round's operations and syncs outside local training: 2 x (H = 1) - (H = 2)."""
    one, two = (count_round(num_clients, h, rank, model_cfg) for h in (1, 2))
    return {"ops": 2 * one["ops"] - two["ops"], "syncs": 2 * one["syncs"] - two["syncs"],
            "step_ops": two["ops"] - one["ops"]}


def cpu_rounds(num_clients: int, repeats: int, rank: int) -> list[float]:
    """CPU seconds of `repeats` rounds on one thread after a warm-up round."""
    torch.set_num_threads(1)
    fed = build(num_clients, "batched", torch.device("cpu"), rank)
    fed.run_round(1)
    seconds = []
    for t in range(repeats):
        start = time.process_time()
        fed.run_round(t + 2)
        seconds.append(time.process_time() - start)
    return seconds


def child(side: str, old: Path, *args: str) -> object:
    """Run this module with `args` in a fresh process on one thread: in this checkout ("new")
    or in `old` ("old", with this file and fslora_min/opcount.py copied into it)."""
    root = ROOT if side == "new" else old
    if side == "old":
        for own in (Path(__file__), Path(fslora_min.__file__).with_name("opcount.py")):
            target = old / own.resolve().relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(own, target)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", __spec__.name, *args]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root,
                          env=env).stdout
    return json.loads(text.strip().splitlines()[-1])


def compare_host(old: Path, clients: tuple[int, ...], repeats: int, rank: int,
                 out_dir: str) -> dict:
    """Old and new host path side by side: operations per round, CPU seconds of a demo round."""
    rows = []
    for n in clients:
        row = {"clients": n} | {side: child(side, old, "--count-child", str(n), "--rank",
                                            str(rank)) for side in ("old", "new")}
        row["ops_ratio"] = row["old"]["ops"] / row["new"]["ops"]
        rows.append(row)
        print(f"{n:3d} clients, outside local training: {row['old']['ops']} -> "
              f"{row['new']['ops']} operations ({row['ops_ratio']:.1f}x fewer), host syncs "
              f"{row['old']['syncs']} -> {row['new']['syncs']}", flush=True)
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    for sitting in range(2):  # alternate, so a drift of the shared machine hits both
        for side in (("old", "new") if sitting == 0 else ("new", "old")):
            seconds[side] += child(side, old, "--cpu-child", str(DEMO_CLIENTS), "--repeats",
                                   str(repeats), "--rank", str(rank))
    medians = {side: statistics.median(s) for side, s in seconds.items()}
    cpu_ratio = medians["old"] / medians["new"]
    print(f"demo round ({DEMO_CLIENTS} clients, one thread): CPU {medians['old']:.2f} s -> "
          f"{medians['new']:.2f} s, old / new = {cpu_ratio:.2f}", flush=True)
    result = {"old": str(old), "old_commit": commit_of(old), "new_commit": commit_of(ROOT),
              "device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "rows": rows, "cpu_seconds": seconds, "cpu_median_s": medians,
              "cpu_ratio": cpu_ratio, "goals": HOST_GOALS, "ops_budget_64": HOST_OPS_BUDGET}
    path = Path(out_dir) / "host.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    write_host_block(Path(out_dir) / "README.md", result)
    print(f"wrote {path}")
    return result


def commit_of(root: Path) -> str:
    """The checkout's commit (a `git archive` copy has none: its folder name stands for it)."""
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and root == ROOT else root.name


def write_host_block(readme: Path, result: dict) -> None:
    """Rewrite the README's host block (between HOST_BLOCK's markers) from `result`."""
    lines = [HOST_BLOCK[0],
             f"Old: {result['old_commit']}; new: {result['new_commit']}; {result['device']}, "
             f"torch {result['torch']}. Operations: non-view ATen operations of one round "
             f"outside local training, every client in one pass.", "",
             "| clients | operations, old | new | old / new | host syncs, old | new |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['clients']} | {r['old']['ops']:,} | {r['new']['ops']:,} | "
              f"{r['ops_ratio']:.1f}x | {r['old']['syncs']:,} | {r['new']['syncs']:,} |"
              for r in result["rows"]]
    med = result["cpu_median_s"]
    lines += ["", f"CPU seconds of a demo round ({DEMO_CLIENTS} clients, one thread, medians of "
                  f"{len(result['cpu_seconds']['new'])}): old {med['old']:.2f}, new "
                  f"{med['new']:.2f}, old / new = {result['cpu_ratio']:.2f} (goal >= "
                  f"{HOST_GOALS['cpu_ratio']}).", HOST_BLOCK[1]]
    text = readme.read_text() if readme.exists() else ""
    start, end = text.find(HOST_BLOCK[0]), text.find(HOST_BLOCK[1])
    block = "\n".join(lines)
    text = (text[:start] + block + text[end + len(HOST_BLOCK[1]):] if start >= 0 <= end
            else text.rstrip("\n") + "\n\n## The host path of a round, old and new\n\n" + block + "\n")
    readme.write_text(text)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_benchmark(cfg: BenchConfig) -> dict:
    device = ComputeConfig(device=cfg.device).torch_device()
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; clients {cfg.clients}; "
          f"{cfg.repeats} timed rounds each (medians)", flush=True)
    rows: list[dict] = []
    result = {"device": name, "device_type": device.type, "torch": torch.__version__,
              "python": platform.python_version(), "config": asdict(cfg),
              "model": asdict(ModelConfig()), "client": asdict(ClientConfig()), "rows": rows}
    path = Path(cfg.out_dir) / f"bench_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for num_clients in cfg.clients:
        r = time_engines(num_clients, device, cfg)
        ratio = r["batched"]["rounds_per_s"] / r["sequential"]["rounds_per_s"]
        goal = GOALS.get(device.type, {}).get(num_clients)
        rows.append({"clients": num_clients, **r, "speedup": ratio, "goal": goal})
        print(f"{num_clients:3d} clients: sequential {r['sequential']['rounds_per_s']:.3f} "
              f"rounds/s ({r['sequential']['peak_mib']:.0f} MiB), batched "
              f"{r['batched']['rounds_per_s']:.3f} rounds/s ({r['batched']['peak_mib']:.0f} MiB, "
              f"{r['batched']['clients_per_pass']} clients per pass):"
              f" batched / sequential = {ratio:.2f}" + (f" (goal >= {goal})" if goal else ""),
              flush=True)
        if device.type == "cuda" and num_clients == 64:
            result["batched_64_fits_4GiB"] = r["batched"]["peak_mib"] <= GPU_MEMORY_GOAL_MIB
        path.write_text(json.dumps(result, indent=1))  # after every row: a cut run keeps its rows
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> None:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m fslora_min.bench_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=d.device, help="cpu, cuda, or auto")
    p.add_argument("--clients", type=int, nargs="+", default=list(d.clients))
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--clients-per-pass", type=int, default=d.clients_per_pass,
                   help="batched engine: clients per pass (0: the device's default)")
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--host", action="store_true",
                   help="old vs new host path: operations per round and a demo round's CPU time")
    p.add_argument("--old", type=Path, help="--host: a checkout of the old code")
    p.add_argument("--memory-child", choices=("sequential", "batched"), help=argparse.SUPPRESS)
    p.add_argument("--count-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpu-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.clients[0], args.memory_child, args.rank, args.clients_per_pass)
        return
    if args.count_child:
        print(json.dumps(host_round(args.count_child, args.rank)))
        return
    if args.cpu_child:
        print(json.dumps(cpu_rounds(args.cpu_child, args.repeats, args.rank)))
        return
    if args.host:
        if args.old is None:
            p.error("--host needs --old DIR, a checkout of the code to compare with")
        compare_host(args.old, tuple(args.clients), args.repeats, args.rank, args.out)
        return
    run_benchmark(BenchConfig(args.device, tuple(args.clients), args.repeats, args.rank,
                              args.clients_per_pass, args.out))


if __name__ == "__main__":
    main()
