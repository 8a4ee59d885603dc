"""The study's runs, each cached under a key of exactly what can change its numbers.

A run's key (`run_key`) holds the whole experiment config but the output folder, the task and
CODE_VERSION; a run to T rounds also serves any shorter horizon (nothing before round t depends
on T). The committed study's logs (results/compare/TASK/runs.jsonl) are read first, so rerunning
it replays it without training.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from fslora_min.experiment import ExperimentConfig, build_federation
from fslora_min.federation import evaluate_clients
from fslora_min.pretrain import numerics
from fslora_min.study.profiles import flops_per_local_step
from fslora_min.tasks import TaskConfig, task_name

CODE_VERSION = 2  # bump when a change alters any run's numbers: older cached runs are not reused
# Bump a task's when its definition changes (no older run of it is reused; other tasks' are).
# planted 2: only the teacher's targets scored (FederatedData.scored_from), strength 4.
TASK_VERSIONS = {"planted": 2}


def task_spec(data: TaskConfig) -> dict:
    """The part of a run's key that names its task: its version (if bumped) and the planted
    update's settings with it."""
    name = task_name(data)
    version = {"version": TASK_VERSIONS[name]} if name in TASK_VERSIONS else {}
    return {"name": name} | version | (asdict(data.planted) if name == "planted" else {})


def run_key(exp: ExperimentConfig) -> str:
    """A run's cache key: the SHA-256 digest of `run_settings` as canonical JSON (the logs hold
    one per run; the JSON is about 1 KiB)."""
    canonical = json.dumps(run_settings(exp), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_settings(exp: ExperimentConfig) -> dict:
    """Exactly what can change a run's numbers: every setting of the experiment but where it is
    written, its rounds (a longer run serves a shorter one) and whether clients are scored each
    round (the curves are the global set's), the task, the numerics version.

    Settings are keyed by their own name (by "group.name" where a name occurs in several groups),
    not by the config class that holds them, so regrouping the config classes keeps the key.
    """
    def leaves(node: object, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], object]]:
        if isinstance(node, dict):
            return [leaf for k, v in node.items() for leaf in leaves(v, path + (k,))]
        return [(path, node)]

    flat = [(p, v) for p, v in leaves(asdict(exp), ())
            if p not in (("out_dir",), ("checkpoint_every",), ("federation", "rounds"),
                         ("federation", "client_eval"))
            and p[:2] != ("data", "planted")  # the task's part of the key (task_spec)
            and not (p == ("client", "lr_scaling") and v == "none")]  # keys before the knob
    names = [p[-1] for p, _ in flat]
    settings = {(p[-1] if names.count(p[-1]) == 1 else ".".join(p[-2:])): v for p, v in flat}
    return {"code_version": CODE_VERSION, "task": task_spec(exp.data), "settings": settings}


def train_run(exp: ExperimentConfig) -> dict:
    """Play one federation (on the task's data) and summarise it; the loss of every round.

    Clients are scored on their own held-out sets only at the end: the curves are the global
    set's (client_eval is not part of a run's key)."""
    exp = replace(exp, federation=replace(exp.federation, client_eval=False))
    federation, info = build_federation(exp, progress=False)
    start = time.perf_counter()
    history = federation.run(progress=False)
    wall = time.perf_counter() - start
    return {
        "method": exp.method, "seed": exp.federation.seed, "lr": exp.client.lr,
        "server_lr": exp.server.server_lr, "rank": info["global_rank"],
        "client_ranks": info["client_ranks"], "trained_ranks": info["trained_ranks"],
        "curve": [_finite(history.initial_loss)] + [_finite(r.heldout_loss)
                                                    for r in history.rounds],
        "acc": history.rounds[-1].heldout_acc,
        "val_loss": _finite(float(np.mean(evaluate_clients(federation.server.model,
                                                           federation.data)[0]))),
        "bytes_down": float(np.mean([b for r in history.rounds for b in r.bytes_down])),
        "bytes_up": float(np.mean([b for r in history.rounds for b in r.bytes_up])),
        "trainable": info["client_trainable_parameters"],
        "flops": [flops_per_local_step(exp, k) for k in info["trained_ranks"]],
        "wall": wall, "coverage": history.coverage, "machine": machine(),
    }


def machine() -> dict[str, object]:
    """What besides the key decides a run's float32 bits: `numerics` and the CPU's model (the
    same torch on another machine's CPU computed different float32 roundings). A
    retrained run equals its stored curve bit for bit only on the machine recorded with it."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), platform.processor())
    return numerics() | {"cpu_model": model}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def cached_record(log: Path, key: str, play: Callable[[], dict]) -> dict:
    """The record under `key` in the JSON-lines `log` ({"key", "run"} per line), or `play()`'s,
    appended to it (the linear study's runs and the rank-energy recordings; the study's own
    runs, with their horizons, are RunCache's)."""
    if log.exists():
        for entry in map(json.loads, log.read_text().splitlines()):
            if entry["key"] == key:
                return entry["run"]
    run = play()
    with log.open("a") as f:
        f.write(json.dumps({"key": key, "run": run}) + "\n")
    return run


class RunCache:
    """Finished runs by key. Reads the committed study's logs and `log`; trains a missing run
    (unless `train` is off: then it is reported missing) and appends it to `log`, one JSON line
    per run written at once, so an interrupted study resumes where it stopped."""

    def __init__(self, log: Path, sources: list[Path], train: bool, bar: tqdm | None = None):
        self.log, self.train, self.bar = log, train, bar
        self.runs: dict[str, list[dict]] = {}
        self.trained_seconds, self.trained = 0.0, 0
        for path in dict.fromkeys([*sources, log]):  # the log may be a source: read it once
            if path.exists():
                self._load(path)

    def _load(self, path: Path) -> None:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a run killed while writing its line: ignore it
                    continue
                raise ValueError(f"{path}: line {i + 1} is not a run record") from None
            self.runs.setdefault(entry["key"], []).append(entry["summary"])

    def get(self, exp: ExperimentConfig) -> dict | None:
        """The run of `exp` (its first `rounds` rounds), from the cache or trained; None when
        it is missing and training is off."""
        key, rounds = run_key(exp), exp.federation.rounds
        longer = [s for s in self.runs.get(key, []) if len(s["curve"]) > rounds]
        if longer:
            return truncate(min(longer, key=lambda s: len(s["curve"])), rounds)
        if not self.train:
            return None
        summary = train_run(exp)
        self.trained_seconds += summary["wall"]
        self.trained += 1
        with self.log.open("a") as f:
            f.write(json.dumps({"key": key, "summary": summary}) + "\n")
        self.runs.setdefault(key, []).append(summary)
        if self.bar is not None:
            self.bar.update()
        return summary


def truncate(summary: dict, rounds: int) -> dict:
    """A run's record at round `rounds`; what is measured only at its end (accuracy, clients'
    held-out loss, coverage) is kept only if `rounds` is its end."""
    if len(summary["curve"]) == rounds + 1:
        return summary
    cut = {k: v for k, v in summary.items() if k not in ("acc", "val_loss", "coverage")}
    cut["curve"] = summary["curve"][:rounds + 1]
    cut["wall"] = summary["wall"] * rounds / (len(summary["curve"]) - 1)
    return cut
