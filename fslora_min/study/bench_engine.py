"""Benchmark: rounds per second of the batched engine against the sequential loop.

    python -m fslora_min.study.bench_engine               # the device in use, 4, 16, 64 clients
    python -m fslora_min.study.bench_engine --device cpu --clients 4 16 --repeats 3

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

    python -m fslora_min.study.bench_engine --host --old OLD --repeats 3   # host path, old vs new

`--host` measures a round's host work with the code of this checkout ("new") and of an older
checkout OLD ("old": this file and fslora_min/opcount.py are copied into it and run there),
in fresh processes on one CPU thread, old-new then new-old:
- non-view ATen operations and host syncs of one round outside local training, every client in
  one pass (as on a GPU), at `--clients` (4, 16, 64): a round of H = 1 local step and one of
  H = 2 differ by exactly one step, so 2 ops(H=1) - ops(H=2) is the round without its steps;
- the time of a default round (H = 10, the device's passes, no evaluation) at
  `--time-clients` (10: the demo's): CPU seconds on one thread (time.process_time) on a CPU,
  wall seconds to the last kernel on a GPU; `--repeats` rounds per process, the median.
It writes host_<device type>.json under `--out` and its block of `--out`/README.md.
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
    cmd = [sys.executable, "-m", "fslora_min.study.bench_engine", "--memory-child", engine,
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


def count_round(num_clients: int, local_steps: int, rank: int, device: torch.device,
                model_cfg: ModelConfig | None = None) -> dict[str, int]:
    """Operations and host syncs of one round (the second; the first warms up), all clients in
    one pass; enough sequences that no client starts a new epoch in the first 4 steps."""
    client = ClientConfig(local_steps=local_steps)
    fed = build(num_clients, "batched", device, rank, num_clients, client, model_cfg,
                DataConfig(train_seqs=5 * client.batch_size))
    fed.run_round(1)
    with OpCounter() as counter:
        fed.run_round(2)
    return {"ops": counter.ops, "syncs": counter.syncs}


def host_round(num_clients: int, rank: int = 16, device: torch.device = torch.device("cpu"),
               model_cfg: ModelConfig | None = None) -> dict[str, int]:
    """A round's operations and syncs outside local training: 2 x (H = 1) - (H = 2)."""
    one, two = (count_round(num_clients, h, rank, device, model_cfg) for h in (1, 2))
    return {"ops": 2 * one["ops"] - two["ops"], "syncs": 2 * one["syncs"] - two["syncs"],
            "step_ops": two["ops"] - one["ops"]}


def round_seconds(num_clients: int, repeats: int, rank: int,
                  device: torch.device) -> list[float]:
    """Seconds of `repeats` default rounds (H = 10, the device's passes) after a warm-up: CPU
    time on one thread on a CPU, wall time to the device's last kernel on a GPU."""
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    fed = build(num_clients, "batched", device, rank)
    fed.run_round(1)
    seconds = []
    for t in range(repeats):
        sync(device)
        start = clock()
        fed.run_round(t + 2)
        sync(device)
        seconds.append(clock() - start)
    return seconds


@dataclass
class HostConfig:
    """What `--host` compares, old code against new."""

    old: Path
    device: str = "cpu"
    counted: tuple[int, ...] = (4, 16, 64)  # clients of the operation counts
    timed: tuple[int, ...] = (DEMO_CLIENTS,)  # clients of the timed rounds
    repeats: int = 3  # timed rounds per process; two processes per side
    rank: int = 16
    out_dir: str = "results/engine"


def host_child(cfg: HostConfig, count: bool) -> dict:
    """One process's share: the counts (if `count`) and the timed rounds."""
    device = ComputeConfig(device=cfg.device).torch_device()
    out: dict = {"seconds": {n: round_seconds(n, cfg.repeats, cfg.rank, device)
                             for n in cfg.timed}}
    if count:
        out["counts"] = {n: host_round(n, cfg.rank, device) for n in cfg.counted}
    return out


def child(side: str, cfg: HostConfig, count: bool) -> dict:
    """`host_child` in a fresh process on one CPU thread: in this checkout ("new") or in
    `cfg.old` ("old", with this file and fslora_min/opcount.py copied into it)."""
    root = ROOT if side == "new" else cfg.old
    if side == "old":
        for own in (Path(__file__), Path(fslora_min.__file__).with_name("opcount.py")):
            target = cfg.old / own.resolve().relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(own, target)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", __spec__.name, "--host-child", json.dumps(
        asdict(cfg) | {"old": str(cfg.old), "count": count})]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if done.returncode:
        raise RuntimeError(f"{side} host child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_host(cfg: HostConfig) -> dict:
    """Old and new host path side by side, in processes that alternate old-new, new-old."""
    runs = {side: [child(side, cfg, True)] for side in ("old", "new")}
    for side in ("new", "old"):
        runs[side].append(child(side, cfg, False))
    rows = []
    for n in cfg.counted:
        old, new = (runs[side][0]["counts"][str(n)] for side in ("old", "new"))
        rows.append({"clients": n, "old": old, "new": new, "ops_ratio": old["ops"] / new["ops"]})
        print(f"{n:3d} clients, outside local training: {old['ops']:,} -> {new['ops']:,} "
              f"operations ({rows[-1]['ops_ratio']:.1f}x fewer), host syncs {old['syncs']:,} "
              f"-> {new['syncs']:,}", flush=True)
    timed = []
    for n in cfg.timed:
        samples = {side: [x for run in runs[side] for x in run["seconds"][str(n)]]
                   for side in runs}
        medians = {side: statistics.median(x) for side, x in samples.items()}
        timed.append({"clients": n, "seconds": samples, "median_s": medians,
                      "ratio": medians["old"] / medians["new"]})
        print(f"{n:3d} clients, a default round ({CLOCKS[cfg.device]}): {medians['old']:.3f} s "
              f"-> {medians['new']:.3f} s, old / new = {timed[-1]['ratio']:.2f}", flush=True)
    device = ComputeConfig(device=cfg.device).torch_device()
    result = {"config": asdict(cfg) | {"old": str(cfg.old)}, "old_commit": cfg.old.name,
              "new_commit": commit_of(ROOT), "device": device_name(device),
              "torch": torch.__version__, "counts": rows, "timed": timed, "goals": HOST_GOALS,
              "ops_budget_64": HOST_OPS_BUDGET}
    path = Path(cfg.out_dir) / f"host_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    write_host_block(Path(cfg.out_dir) / "README.md", result)
    print(f"wrote {path}")
    return result


CLOCKS = {"cpu": "CPU seconds, one thread", "cuda": "wall seconds", "auto": "seconds"}


def commit_of(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def write_host_block(readme: Path, result: dict) -> None:
    """Rewrite the README's host block of this device type from `result` (appended if none)."""
    kind = result["config"]["device"]
    begin, end = f"<!-- host:{kind} -->", f"<!-- /host:{kind} -->"
    lines = [begin, f"Old: {result['old_commit']}; new: {result['new_commit']}; "
                    f"{result['device']}, torch {result['torch']}. Operations: non-view ATen "
                    f"operations of one round outside local training, every client in one "
                    f"pass (budget at 64 clients: {HOST_OPS_BUDGET:,}).", "",
             "| clients | operations, old | new | old / new | host syncs, old | new |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['clients']} | {r['old']['ops']:,} | {r['new']['ops']:,} | "
              f"{r['ops_ratio']:.1f}x | {r['old']['syncs']:,} | {r['new']['syncs']:,} |"
              for r in result["counts"]]
    lines += ["", f"| clients | a default round, old ({CLOCKS[kind]}, median) | new | old / new |",
              "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['clients']} | {r['median_s']['old']:.3f} | {r['median_s']['new']:.3f} | "
              f"{r['ratio']:.2f} |" for r in result["timed"]]
    lines.append(end)
    text = readme.read_text() if readme.exists() else ""
    i, j = text.find(begin), text.find(end)
    block = "\n".join(lines)
    text = (text[:i] + block + text[j + len(end):] if i >= 0 and j >= 0
            else text.rstrip("\n") + "\n\n" + block + "\n")
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
    p = argparse.ArgumentParser(prog="python -m fslora_min.study.bench_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=d.device, help="cpu, cuda, or auto")
    p.add_argument("--clients", type=int, nargs="+", default=list(d.clients))
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--clients-per-pass", type=int, default=d.clients_per_pass,
                   help="batched engine: clients per pass (0: the device's default)")
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--host", action="store_true",
                   help="old vs new host path: operations and host syncs per round outside "
                        "local training (at --clients), a default round's time (at "
                        "--time-clients)")
    p.add_argument("--old", type=Path, help="--host: a checkout of the old code")
    p.add_argument("--time-clients", type=int, nargs="+", default=list(HostConfig.timed))
    p.add_argument("--memory-child", choices=("sequential", "batched"), help=argparse.SUPPRESS)
    p.add_argument("--host-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.clients[0], args.memory_child, args.rank, args.clients_per_pass)
        return
    if args.host_child:
        given = json.loads(args.host_child)
        count = given.pop("count")
        print(json.dumps(host_child(HostConfig(**given | {"old": Path(given["old"])}), count)))
        return
    if args.host:
        if args.old is None:
            p.error("--host needs --old DIR, a checkout of the code to compare with")
        device = "cpu" if args.device == "auto" else args.device
        compare_host(HostConfig(args.old, device, tuple(args.clients), tuple(args.time_clients),
                                args.repeats, args.rank, args.out))
        return
    run_benchmark(BenchConfig(args.device, tuple(args.clients), args.repeats, args.rank,
                              args.clients_per_pass, args.out))


if __name__ == "__main__":
    main()
