"""The reproduction study: each claim of the paper (arXiv 2501.19389, section 5) against the
baselines, with a verdict and the conditions under which it holds (statistics:
fslora_min/protocol.py).

Protocol, for every row of every table:
1. Tuning on a grid of client lr x server step eta_g (plain averaging X <- X + eta_g D, so
   eta_g = 1 is FedAvg's average; a server Adam(W) row tunes its own step), on tuning seeds that
   are never reported. Successive halving: every grid point on every tuning seed to `rung`
   rounds, then the best `keep` fraction to the middle horizon; the lowest mean global held-out
   loss over the tuning seeds (each on its own data) wins. A point that diverged on any tuning
   seed is never chosen; a best point on a grid edge widens the grid once and is flagged if it
   is still on an edge; a grid where every point diverged widens once towards smaller steps
   (both axes). The whole grid is written beside each table (NAME.grid.md).
2. Evaluation: the chosen point on every evaluation seed to the long horizon, the global
   held-out loss recorded every round. Seed s sets DataConfig.seed (topics, base model,
   partition, held-out sets) and FederationConfig.seed (participants, sketches, minibatches).
3. Claims "a < b": the paired difference L_a(s) - L_b(s) over the seeds, its 95% t-interval and
   verdict at the short, middle and long horizon.

Every run is cached (RunCache) under a key of exactly what can change its numbers (the whole
experiment config but the output folder, the task, CODE_VERSION); a run to T rounds also serves
any shorter horizon (nothing before round t depends on T). The committed study's runs
(results/compare/TASK/runs.jsonl) are read first, so rerunning it replays it without training.
Each task writes into a folder of its own (OUT/TASK/): its runs, tables, grids, figures, verdicts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fslora_min import answer
from fslora_min.client import ClientConfig
from fslora_min.data import DataConfig
from fslora_min.experiment import ExperimentConfig, build_federation
from fslora_min.federation import Federation, FederationConfig, evaluate
from fslora_min.knobs import ConfigError, check_knobs, knob
from fslora_min.lora import LoRAConfig
from fslora_min.methods import METHODS, Method, make_method
from fslora_min.model import ModelConfig
from fslora_min.planted import PlantedConfig, make_planted_data
from fslora_min.pretrain import PretrainConfig, load_or_pretrain
from fslora_min.shakespeare import VOCAB, ShakespeareConfig
from fslora_min.profiles import (DEFAULT_PROFILES, budgets_from_profiles, memory_bytes,
                                 upload_bytes)
from fslora_min.protocol import (NOT_REPRODUCED, REPRODUCED, Choice, choose, diverged,
                                 diverged_seeds, holm, paired_interval, plateau, verdict, widen)
from fslora_min.server import ServerConfig

CODE_VERSION = 2  # bump when a change alters any run's numbers: older cached runs are not reused
COMMITTED = Path(__file__).resolve().parents[1] / "results" / "compare"
MAIN_METHODS = ("fslora", "hetlora", "flexlora", "flora", "fedavg-min", "fedavg-full")
BASELINES = ("hetlora", "flexlora", "flora", "fedavg-min")  # the paper says FSLoRA beats these
IMPORTANCE_METHODS = ("fslora", "fslora-topk", "fslora-importance")
RECENT_METHODS = ("fslora", "fed-plora", "flasc", "ffa-lora", "rolora", "fedex-lora")  # since
STUDY_TASKS = ("synthetic", "planted", "shakespeare")  # shakespeare: fslora_min/shakespeare.py
TABLES = {"synthetic": ("main", "recent", "adamw", "server_one", "server_adam", "aggregation",
                        "hetlora_scale", "lr_scaling", "published", "importance", "global_rank",
                        "sketch_ratio"),
          "planted": ("planted_ladder", "planted_small", "planted_ratios", "planted_global_rank"),
          "shakespeare": ("main", "recent")}


@dataclass
class CompareConfig:
    """The study. Its knobs (made by `knob`) are `compare`'s flags, checked once by `check_knobs`
    (fslora_min/knobs.py); the plain fields are the protocol's settings, set in code."""

    task: str = knob("synthetic", "synthetic: the topic-Markov task (fslora_min/data.py); "
                                  "planted: text from a teacher with a planted rank-R* update of "
                                  "one layer, so that the rank binds (fslora_min/planted.py); "
                                  "shakespeare: LEAF's next-character task "
                                  "(fslora_min/shakespeare.py)", choices=STUDY_TASKS)
    tables: tuple[str, ...] = knob((), "which of the task's tables",
                                   choices=tuple(sorted({t for ts in TABLES.values() for t in ts})),
                                   default_text="all of the task's")
    methods: tuple[str, ...] = knob(MAIN_METHODS, "rows of the method tables, fslora among them",
                                    choices=METHODS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # evaluation seeds of the decisive tables
    reduced_seeds: tuple[int, ...] = (0, 1, 2)  # of the convention ablations
    tune_seeds: tuple[int, ...] = (100, 101)  # never reported
    lr_grid: tuple[float, ...] = knob((0.03, 0.1, 0.3, 1.0), "client learning rates (SGD) every "
                                                             "row is tuned over", check="positive")
    adamw_lr_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)  # client lr, AdamW
    server_lr_grid: tuple[float, ...] = knob((1.0, 2.0, 4.0, 8.0), "server steps eta_g (plain "
                                             "averaging) every row is tuned over",
                                             check="positive")
    adam_server_lr_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)  # server Adam(W)
    horizons: tuple[int, int, int] = (30, 100, 300)  # short, middle (tuning), long
    # Set, it replaces the last of `horizons`; None keeps it.
    rounds: int | None = knob(None, "the long horizon T of the decisive tables",
                              check="positive integer", default_text=str(horizons[2]))
    reduced_horizons: tuple[int, int, int] = (30, 60, 100)  # of the convention ablations
    rung: float = 0.25  # successive halving: every grid point to rung x middle horizon ...
    keep: float = 0.25  # ... and this fraction of them to the middle horizon
    num_clients: int = 8  # N, all participating
    rank: int = 16  # r
    lora_alpha: float = 32.0
    local_steps: int = 5  # H
    batch_size: int = 8
    pretrain_steps: int = 300
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    out_dir: str = knob("runs/compare", "output folder, each task in a folder of its own "
                                        "(OUT/TASK/); the committed study's runs are replayed, "
                                        "not retrained, whatever it is", flag="--out")

    def __post_init__(self) -> None:
        check_knobs(self)
        bad = set(self.tables) - set(TABLES[self.task])
        if bad:
            raise ConfigError(self, "tables", f"{sorted(bad)} are not tables of task "
                                              f"{self.task!r}: {TABLES[self.task]}")
        if "fslora" not in self.methods:
            raise ConfigError(self, "methods", f"must include fslora, got {self.methods}")
        if self.rounds is not None:
            if self.rounds < self.horizons[1]:
                raise ConfigError(self, "rounds", f"must be at least the middle horizon, "
                                                  f"{self.horizons[1]}, got {self.rounds}")
            self.horizons = (*self.horizons[:2], self.rounds)
        if min(len(self.seeds), len(self.reduced_seeds), len(self.tune_seeds)) < 2:
            raise ValueError("a paired interval needs at least 2 evaluation seeds and the "
                             "protocol at least 2 tuning seeds")
        if set(self.tune_seeds) & (set(self.seeds) | set(self.reduced_seeds)):
            raise ValueError(f"tuning seeds {self.tune_seeds} must not be evaluation seeds")
        for h in (self.horizons, self.reduced_horizons):
            if not 1 <= h[0] <= h[1] <= h[2]:
                raise ValueError(f"horizons must be 1 <= short <= middle <= long, got {h}")
        if not (0 < self.rung <= 1 and 0 < self.keep <= 1):
            raise ValueError(f"rung and keep must be in (0, 1], got {self.rung}, {self.keep}")

    @property
    def table_names(self) -> tuple[str, ...]:
        return self.tables or TABLES[self.task]


def quick_config(out_dir: str = "runs/compare-quick", task_name: str = "synthetic"
                 ) -> CompareConfig:
    """The main table in miniature (the tests run it): 4 clients, 2 + 2 seeds, one grid point,
    3 rounds; every code path of a row but the halving and the widening (tested apart)."""
    tables = ("planted_ladder",) if task_name == "planted" else ("main",)
    return CompareConfig(task=task_name, tables=tables, seeds=(0, 1), reduced_seeds=(0, 1),
                         lr_grid=(0.03,), adamw_lr_grid=(0.01,), server_lr_grid=(1.0,),
                         adam_server_lr_grid=(0.01,), horizons=(1, 2, 3),
                         reduced_horizons=(1, 2, 3), rung=0.5, keep=0.5, num_clients=4,
                         pretrain_steps=100, out_dir=out_dir,
                         planted=PlantedConfig(rank=4, probe_seqs=32, train_seqs=32))


def task(cfg: CompareConfig) -> ExperimentConfig:
    """The tiny task: a 2-layer width-32 transformer, 12 LoRA modules, 16-token sequences (of
    the synthetic language, or 16-character windows of Shakespeare's roles); the global
    held-out loss is evaluated every round."""
    model = ModelConfig(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=32)
    data = DataConfig(vocab_size=32, seq_len=16, n_base_topics=4, successors=2, train_seqs=32,
                      heldout_seqs=8, global_heldout_seqs=64)
    if cfg.task == "shakespeare":
        model, data = replace(model, vocab_size=len(VOCAB)), ShakespeareConfig(seq_len=16)
    if cfg.task == "planted":
        data = replace(data, train_seqs=cfg.planted.train_seqs)
    fed = FederationConfig(num_clients=cfg.num_clients, participants=cfg.num_clients,
                           rounds=cfg.horizons[2], eval_every=1)
    return ExperimentConfig(model=model, data=data, federation=fed,
                            lora=LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha),
                            pretrain=PretrainConfig(steps=cfg.pretrain_steps, batch_size=32,
                                                    lr=1e-2),
                            client=ClientConfig(local_steps=cfg.local_steps,
                                                batch_size=cfg.batch_size))


def module_shapes(exp: ExperimentConfig) -> list[tuple[int, int]]:
    """(m, n) of every LoRA module of the task's model (all six projections per block)."""
    d = exp.model.d_model
    per_block = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]  # q, k, v, out, fc, proj
    return per_block * exp.model.n_layer


def flops_per_local_step(exp: ExperimentConfig, k: int) -> float:
    """~ tokens * (4 P_lin + 6 k sum(m + n)) + attention: one minibatch forward and backward.

    The frozen linear weights (P_lin numbers, LM head included) cost 2 FLOPs per weight per token
    forward and 2 backward (activation gradients only); the LoRA factors 2 forward and 4 backward
    (both gradients); causal attention ~ 2 * 2 * t * d per token per layer forward, x3 with the
    backward.
    """
    mc, tokens = exp.model, exp.client.batch_size * exp.data.seq_len
    p_lin = sum(m * n for m, n in module_shapes(exp)) + mc.d_model * mc.vocab_size
    lora = k * sum(m + n for m, n in module_shapes(exp))
    attention = 3 * 4 * exp.data.seq_len * mc.d_model * mc.n_layer
    return tokens * (4 * p_lin + 6 * lora + attention)


def budget_table(exp: ExperimentConfig, cfg: CompareConfig) -> tuple[str, list[int]]:
    """Each client's device budgets, its k_i, and the memory (with the clients' own optimizer's
    state) and upload that k_i uses."""
    shapes = module_shapes(exp)
    assigned = budgets_from_profiles(DEFAULT_PROFILES, cfg.num_clients, shapes, cfg.rank,
                                     optimizer=exp.client.optimizer)
    lines = ["| client | device | memory budget (KiB) | upload budget (KiB/round) | k_i | "
             "memory used (KiB) | upload used (KiB/round) |", "|" + "---|" * 7]
    for i, (p, k) in enumerate(assigned):
        lines.append(f"| {i} | {p.name} | {p.memory_bytes / 1024:.1f} | "
                     f"{p.upload_bytes / 1024:.1f} | {k} | "
                     f"{memory_bytes(k, shapes, 4, exp.client.optimizer) / 1024:.1f} | "
                     f"{upload_bytes(k, shapes, 4) / 1024:.1f} |")
    return "\n".join(lines) + "\n", [k for _, k in assigned]


# ---------------------------------------------------------------------------------- runs, cached

def task_spec(cfg: CompareConfig) -> dict:
    """The part of a run's key that the ExperimentConfig does not hold: which task."""
    return {"name": cfg.task} | (asdict(cfg.planted) if cfg.task == "planted" else {})


def run_key(exp: ExperimentConfig, spec: dict) -> str:
    """A run's cache key: the SHA-256 digest of `run_settings` as canonical JSON (the logs hold
    one per run; the JSON is about 1 KiB)."""
    canonical = json.dumps(run_settings(exp, spec), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_settings(exp: ExperimentConfig, spec: dict) -> dict:
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
            and not (p == ("client", "lr_scaling") and v == "none")]  # keys before the knob
    names = [p[-1] for p, _ in flat]
    settings = {(p[-1] if names.count(p[-1]) == 1 else ".".join(p[-2:])): v for p, v in flat}
    return {"code_version": CODE_VERSION, "task": spec, "settings": settings}


def train_run(exp: ExperimentConfig, spec: dict) -> dict:
    """Play one federation (on the task's data) and summarise it; the loss of every round.

    Clients are scored on their own held-out sets only at the end: the curves are the global
    set's (client_eval is not part of a run's key)."""
    exp = replace(exp, federation=replace(exp.federation, client_eval=False))
    federation, info = build_federation(exp, progress=False)
    if spec["name"] == "planted":
        base, _ = load_or_pretrain(exp.model, exp.data, exp.pretrain, progress=False)
        planted = PlantedConfig(**{k: v for k, v in spec.items() if k != "name"})
        data = make_planted_data(base, exp.data, exp.federation.num_clients, planted)
        federation = Federation(federation.server, data, federation.client_ranks,
                                exp.federation, exp.client, federation.method, exp.compute)
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
        "val_loss": _finite(float(np.mean([evaluate(federation.server.model, c.heldout)[0]
                                           for c in federation.data.clients]))),
        "bytes_down": float(np.mean([b for r in history.rounds for b in r.bytes_down])),
        "bytes_up": float(np.mean([b for r in history.rounds for b in r.bytes_up])),
        "trainable": info["client_trainable_parameters"],
        "flops": [flops_per_local_step(exp, k) for k in info["trained_ranks"]],
        "wall": wall, "coverage": history.coverage,
    }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


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

    def get(self, exp: ExperimentConfig, spec: dict) -> dict | None:
        """The run of `exp` (its first `rounds` rounds), from the cache or trained; None when
        it is missing and training is off."""
        key, rounds = run_key(exp, spec), exp.federation.rounds
        longer = [s for s in self.runs.get(key, []) if len(s["curve"]) > rounds]
        if longer:
            return truncate(min(longer, key=lambda s: len(s["curve"])), rounds)
        if not self.train:
            return None
        summary = train_run(exp, spec)
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


# ------------------------------------------------------------------------------- tables, claims

@dataclass
class RowSpec:
    label: str
    exp: ExperimentConfig
    lr_grid: tuple[float, ...]
    step_grid: tuple[float, ...]  # the server's step: eta_g (plain averaging) or Adam(W)'s lr


@dataclass
class TableSpec:
    name: str
    title: str
    condition: str  # how every row is trained, in words (the verdict table's column)
    rows: list[RowSpec]
    claims: list[tuple[str, str]]  # (a, b): the paper says row a reaches a lower loss than b
    seeds: tuple[int, ...]
    horizons: tuple[int, int, int]
    paper: bool = True  # False: the claims are questions the paper did not ask (later methods)


@dataclass
class Row:
    """A tuned and evaluated row; `runs` may hold fewer seeds than asked (a partial study)."""

    label: str
    choice: Choice
    grid: dict[tuple[float, float], list[dict | None]]  # point -> runs on the tuning seeds
    runs: list[dict]
    lr: float = math.nan
    server_lr: float = math.nan


def with_run(exp: ExperimentConfig, seed: int, lr: float, step: float,
             rounds: int) -> ExperimentConfig:
    """`exp` at one seed (its data and its federation), client lr, server step and horizon."""
    return replace(exp, data=replace(exp.data, seed=seed),
                   federation=replace(exp.federation, seed=seed, rounds=rounds),
                   client=replace(exp.client, lr=lr), server=replace(exp.server, server_lr=step))


def tune(row: RowSpec, tune_seeds: tuple[int, ...], middle: int, cfg: CompareConfig,
         cache: RunCache, spec: dict) -> tuple[Choice, dict]:
    """Successive halving over the row's grid, widened once past an edge (module docstring)."""
    lrs, steps = list(row.lr_grid), list(row.step_grid)
    rung = max(1, round(cfg.rung * middle))
    grid: dict[tuple[float, float], list[dict | None]] = {}

    def score(point: tuple[float, float], rounds: int) -> float:
        runs = [cache.get(with_run(row.exp, s, *point, rounds), spec) for s in tune_seeds]
        grid[point] = runs
        if any(r is None for r in runs):
            return math.nan  # missing (no training): the choice waits for it
        if any(diverged(r["curve"]) for r in runs):
            return math.inf
        return float(np.mean([r["curve"][-1] for r in runs]))

    for attempt in range(2):
        points = [(lr, g) for lr in lrs for g in steps]
        first = {p: score(p, rung) for p in points}
        if any(math.isnan(s) for s in first.values()):
            return Choice(None, ("tuning incomplete",)), grid
        ranked = sorted((p for p in points if math.isfinite(first[p])), key=first.get)
        survivors = ranked[:max(1, math.ceil(cfg.keep * len(points)))]
        final = {p: score(p, middle) for p in survivors} if rung < middle else first
        if any(math.isnan(s) for s in final.values()):
            return Choice(None, ("tuning incomplete",)), grid
        choice = choose(final | {p: math.inf for p in points if p not in final}, lrs, steps)
        # every point diverged: the steps that learn lie below the grid
        edges = ("lowest lr", "lowest server step") if choice.point is None else choice.edges
        if not edges or attempt == 1:
            return choice, grid
        lrs = widen(lrs, edges, "lr", 3.0)
        steps = widen(steps, edges, "server step", 2.0)
    raise AssertionError("unreachable")


def evaluate_row(row: RowSpec, table: TableSpec, cfg: CompareConfig, cache: RunCache,
                 spec: dict) -> Row:
    choice, grid = tune(row, cfg.tune_seeds, table.horizons[1], cfg, cache, spec)
    if choice.point is None:
        return Row(row.label, choice, grid, [])
    runs = [cache.get(with_run(row.exp, s, *choice.point, table.horizons[2]), spec)
            for s in table.seeds]
    return Row(row.label, choice, grid, [r for r in runs if r is not None], *choice.point)


def planned_rounds(table: TableSpec, cfg: CompareConfig) -> int:
    """Rounds the table trains when no run is cached and no grid is widened (the budget)."""
    middle = table.horizons[1]
    rung = max(1, round(cfg.rung * middle))
    total = 0
    for row in table.rows:
        points = len(row.lr_grid) * len(row.step_grid)
        kept = max(1, math.ceil(cfg.keep * points)) if rung < middle else 0
        total += len(cfg.tune_seeds) * (points * rung + kept * middle)
        total += len(table.seeds) * table.horizons[2]
    return total


def claim_results(table: TableSpec, rows: dict[str, Row]) -> list[dict]:
    """Per claim and horizon: the paired difference's interval, its raw p-value and verdict
    (None and "pending": < 2 seeds), and which rows diverged by then (a diverged cell's verdict
    says so and holm_correct leaves it out of the family). The corrected verdict comes from
    holm_correct, over the whole task."""
    out = []
    for a, b in table.claims:
        ra = {r["seed"]: r["curve"] for r in rows[a].runs}
        rb = {r["seed"]: r["curve"] for r in rows[b].runs}
        seeds = sorted(set(ra) & set(rb))
        for name, h in zip(("short", "middle", "long"), table.horizons):
            p = paired_interval([ra[s][h] - rb[s][h] for s in seeds]) if len(seeds) >= 2 else None
            gone = [f"{label} ({k} of {len(curves)} seeds)" for label, curves in
                    ((a, [ra[s] for s in seeds]), (b, [rb[s] for s in seeds]))
                    if (k := diverged_seeds(curves, h))]
            raw = ("diverged: " + ", ".join(gone) if gone and p else
                   claim_word(table, a, b, verdict(p)) if p else "pending")
            out.append({"a": a, "b": b, "horizon": name, "rounds": h, "seeds": len(seeds),
                        "tuned": table.horizons[1], "paired": p, "diverged": bool(gone),
                        "raw": raw, "p_holm": None, "family": 0, "verdict": raw})
    return out


def claim_word(table: TableSpec, a: str, b: str, word: str) -> str:
    """A verdict in the table's words: the paper's claim reproduced or not, or (a table of
    questions the paper did not ask) which row is lower."""
    if table.paper:
        return word
    return {REPRODUCED: f"{a} lower", NOT_REPRODUCED: f"{b} lower"}.get(word, word)


def holm_correct(results: list[tuple[TableSpec, list[dict]]]) -> None:
    """Holm's correction over one task's claims x horizons (protocol.holm): every cell with a
    finite p-value and no diverged row is in the family; its `verdict` becomes the corrected
    one (`raw` keeps the uncorrected). Diverged and pending cells keep their word."""
    family = [(table, c) for table, claims in results for c in claims
              if c["paired"] and not c["diverged"] and math.isfinite(c["paired"].p)]
    for (table, c), adjusted in zip(family, holm([c["paired"].p for _, c in family])):
        c["p_holm"], c["family"] = adjusted, len(family)
        c["verdict"] = claim_word(table, c["a"], c["b"], verdict(c["paired"], adjusted))


def server_steps(method: str, grid: tuple[float, ...]) -> tuple[float, ...]:
    """The server-step grid of a method's row: eta_g = 1 alone when its server sets the global
    factors itself (FlexLoRA's SVD, FLoRA's merge) instead of stepping them by eta_g D."""
    return grid if make_method(method, 1, torch.Generator()).server_step else (1.0,)


def build_tables(cfg: CompareConfig) -> list[TableSpec]:
    """The task's tables: their rows (configs and grids), claims, seeds and horizons."""
    base = task(cfg)
    full, reduced = (cfg.seeds, cfg.horizons), (cfg.reduced_seeds, cfg.reduced_horizons)

    def profile_ranks(exp: ExperimentConfig) -> ExperimentConfig:
        return replace(exp, client_ranks=budget_table(exp, cfg)[1])

    sgd = profile_ranks(base)
    adamw = profile_ranks(replace(base, client=replace(base.client, optimizer="adamw")))
    avg_grid, adam_grid = cfg.server_lr_grid, cfg.adam_server_lr_grid

    def method_rows(exp: ExperimentConfig, lrs: tuple, steps: tuple,
                    methods: tuple[str, ...]) -> list[RowSpec]:
        return [RowSpec(m, replace(exp, method=m), lrs, server_steps(m, steps)) for m in methods]

    def vs_baselines(rows: list[RowSpec], a: str = "fslora") -> list[tuple[str, str]]:
        return [(a, r.label) for r in rows if r.label in BASELINES]

    methods = cfg.methods
    pair = tuple(m for m in ("fslora", "hetlora") if m in methods)
    k = 4
    rank_rows = [RowSpec(f"r={k * c}", replace(sgd, client_ranks=[k] * cfg.num_clients,
                                               lora=replace(sgd.lora, rank=k * c)),
                         cfg.lr_grid, avg_grid) for c in (1, 2, 4)]

    def global_rank(name: str, title: str) -> TableSpec:
        return TableSpec(name, title,
                         "SGD clients, eta_g tuned", rank_rows, [("r=16", "r=4")], *reduced)

    tables = []
    if cfg.task == "planted":
        exp = sgd
        ladder = [RowSpec(f"r={r}", replace(exp, method="fedavg-full",
                                            client_ranks=[r] * cfg.num_clients,
                                            lora=replace(exp.lora, rank=r)),
                          cfg.lr_grid, avg_grid) for r in sorted({2, 4, cfg.planted.rank})]
        small = replace(exp, client_ranks=[1 + i % 4 for i in range(cfg.num_clients)])
        small_rows = method_rows(small, cfg.lr_grid, avg_grid, methods)
        ratio_rows = method_rows(exp, cfg.lr_grid, avg_grid, methods)
        biggest = ladder[-1].label
        tables += [
            TableSpec("planted_ladder", f"Planted rank {cfg.planted.rank}: FedAvg-LoRA, every "
                      f"client at rank r", "SGD clients, eta_g tuned, every client k = r",
                      ladder, [(biggest, r.label) for r in ladder[:-1]], *full),
            TableSpec("planted_small", "Planted rank: small client ranks k_i = 1, 2, 3, 4",
                      "SGD clients, eta_g tuned, k_i <= 4", small_rows, vs_baselines(small_rows),
                      *reduced),
            TableSpec("planted_ratios", "Planted rank: the paper's ratios (device profiles)",
                      "SGD clients, eta_g tuned, k_i = 2, 4, 8, 12", ratio_rows,
                      vs_baselines(ratio_rows), *reduced),
            global_rank("planted_global_rank", f"Planted rank: global rank r, every client "
                        f"k_i = {k}")]
        return [t for t in tables if t.name in cfg.table_names]
    main_rows = method_rows(sgd, cfg.lr_grid, avg_grid, methods)
    adamw_rows = method_rows(adamw, cfg.adamw_lr_grid, avg_grid, methods)
    published = RowSpec("fslora as published", replace(
        adamw, method="fedavg-full", client=replace(adamw.client, weight_decay=0.01),
        lora=replace(adamw.lora, rslora=True),
        server=ServerConfig(optimizer="adamw", weight_decay=0.01)), cfg.adamw_lr_grid, adam_grid)
    adam_exp = replace(sgd, server=ServerConfig(optimizer="adam"))
    coverage = replace(sgd, server=ServerConfig(aggregation="coverage"))
    ratio_rows = [RowSpec(f"k/r={ratio:g}", replace(
        sgd, client_ranks=[max(1, round(ratio * cfg.rank))] * cfg.num_clients), cfg.lr_grid,
        avg_grid)
        for ratio in (1 / 8, 1 / 4, 1 / 2, 3 / 4)]
    imp_rows = method_rows(sgd, cfg.lr_grid, avg_grid, IMPORTANCE_METHODS)
    recent_rows = method_rows(sgd, cfg.lr_grid, avg_grid, RECENT_METHODS)
    hetlora_rows = method_rows(sgd, cfg.lr_grid, avg_grid, ("fslora", "hetlora",
                                                             "hetlora-rescaled"))
    ratio_lr = replace(sgd, client=replace(sgd.client, lr_scaling="ratio"))
    lr_rows = [RowSpec("fslora", replace(sgd, method="fslora"), cfg.lr_grid, avg_grid),
               RowSpec("fslora lr x k_i/r", replace(ratio_lr, method="fslora"), cfg.lr_grid,
                       avg_grid),
               RowSpec("hetlora lr x k_i/r", replace(ratio_lr, method="hetlora"), cfg.lr_grid,
                       avg_grid)]
    tables = [
        TableSpec("main", "FSLoRA against the baselines at the same client budgets",
                  "SGD clients, eta_g tuned", main_rows, vs_baselines(main_rows), *full),
        TableSpec("recent", "FSLoRA against the methods published since, at the same client "
                  "budgets", "SGD clients, eta_g tuned", recent_rows,
                  [("fslora", m) for m in RECENT_METHODS[1:]], *reduced, paper=False),
        TableSpec("adamw", "Client AdamW (budgets from AdamW's own memory)",
                  "AdamW clients, eta_g tuned", adamw_rows, vs_baselines(adamw_rows), *reduced),
        TableSpec("server_one", "Plain averaging, eta_g = 1 (no server step tuned)",
                  "SGD clients, eta_g = 1", method_rows(sgd, cfg.lr_grid, (1.0,), methods),
                  vs_baselines(main_rows), *reduced),
        TableSpec("server_adam", "Server Adam on the averaged delta (FedOpt)",
                  "SGD clients, server Adam", method_rows(adam_exp, cfg.lr_grid, adam_grid, pair),
                  [("fslora", "hetlora")] if len(pair) == 2 else [], *reduced),
        TableSpec("aggregation", "FSLoRA averaging over the participants vs over the clients "
                  "that drew each index", "SGD clients, eta_g tuned",
                  [RowSpec("fslora", replace(sgd, method="fslora"), cfg.lr_grid, avg_grid),
                   RowSpec("fslora per-index", replace(coverage, method="fslora"), cfg.lr_grid,
                           avg_grid)]
                  + [r for r in main_rows if r.label == "hetlora"],
                  [("fslora per-index", "hetlora")] if "hetlora" in methods else [], *reduced),
        TableSpec("hetlora_scale", "HetLoRA's scale: alpha / r (ours: the global scale, no "
                  "rescaling) vs alpha / k_i (the FSLoRA authors' baseline code)",
                  "SGD clients, eta_g tuned", hetlora_rows,
                  [("fslora", "hetlora"), ("fslora", "hetlora-rescaled")], *reduced),
        TableSpec("lr_scaling", "Client lr scaled by k_i / r (a small client steps less)",
                  "SGD clients at lr x k_i / r, eta_g tuned", lr_rows,
                  [("fslora lr x k_i/r", "hetlora lr x k_i/r"), ("fslora lr x k_i/r", "fslora")],
                  *reduced),
        TableSpec("published", "FSLoRA as the authors' code runs (every client full rank r, "
                  "AdamW clients, server AdamW) against the AdamW baselines",
                  "AdamW clients (weight decay 0.01), server AdamW (0.01), rsLoRA",
                  [published] + [r for r in adamw_rows if r.label in BASELINES],
                  vs_baselines(adamw_rows, "fslora as published"), *reduced),
        TableSpec("importance", "Uniform index sets vs importance without / with reweighting",
                  "SGD clients, eta_g tuned", imp_rows,
                  [("fslora", "fslora-topk"), ("fslora-importance", "fslora-topk")], *reduced),
        global_rank("global_rank", f"Global rank r, every client k_i = {k}"),
        TableSpec("sketch_ratio", f"Sketching ratio k/r (every client the same), r = {cfg.rank}",
                  "SGD clients, eta_g tuned", ratio_rows, [("k/r=0.75", "k/r=0.25")], *reduced),
    ]
    return [t for t in tables if t.name in cfg.table_names]


# ------------------------------------------------------------------------------------- writing

def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a failed write never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def row_table(table: TableSpec, rows: list[Row]) -> str:
    """Per row: chosen point, grid edges, seeds run, loss at each horizon, plateau check."""
    h = table.horizons
    head = ["row", "R", "k_i", "client lr", "server step", "grid edge", "seeds"]
    head += [f"loss @ {t}" for t in h] + [f"plateau @ {h[2]}", f"diverged @ {h[2]}",
                                          "KiB up/client-round"]
    body = []
    for row in rows:
        r0 = row.runs[0] if row.runs else None
        cells = [row.label, str(r0["rank"]) if r0 else "-",
                 ",".join(map(str, sorted(set(r0["trained_ranks"])))) if r0 else "-",
                 f"{row.lr:g}", f"{row.server_lr:g}",
                 ", ".join(row.choice.edges) or ("no" if row.choice.point else "all diverged"),
                 f"{len(row.runs)} of {len(table.seeds)}"]
        cells += [mean_std([r["curve"][t] for r in row.runs]) for t in h]
        flat = [plateau(r["curve"]) for r in row.runs]
        gone = diverged_seeds([r["curve"] for r in row.runs], h[2])
        cells += [f"{sum(flat)} of {len(flat)} seeds" if flat else "-",
                  f"{gone} of {len(flat)} seeds" if flat else "-",
                  f"{r0['bytes_up'] / 1024:.1f}" if r0 else "-"]
        body.append(cells)
    return markdown(head, body)


CLAIM_HEAD = ["horizon (rounds)", "rows tuned at", "seeds", "a - b [95% CI]", "p",
              "p (Holm)", "verdict (raw)", "verdict (Holm)"]


def claim_cells(c: dict) -> list[str]:
    """A claim's cells after its name: horizon, the rounds every row was tuned at, seeds, the
    interval, raw and Holm-adjusted p (holm_correct), raw and corrected verdicts."""
    p = c["paired"]
    return [f"{c['horizon']} ({c['rounds']})", str(c["tuned"]), str(c["seeds"]),
            p.text() if p else "-", f"{p.p:.2g}" if p and math.isfinite(p.p) else "-",
            f"{c['p_holm']:.2g}" if c["p_holm"] is not None else "-", c["raw"], c["verdict"]]


def claim_table(results: list[dict]) -> str:
    return markdown(["claim a < b", *CLAIM_HEAD],
                    [[f"{c['a']} < {c['b']}", *claim_cells(c)] for c in results])


def grid_table(table: TableSpec, rows: list[Row], tune_seeds: tuple[int, ...]) -> str:
    """Every tuning run: row, client lr, server step, rounds, the final loss per tuning seed."""
    body = []
    for row in rows:
        for (lr, step), runs in row.grid.items():
            losses = ["missing" if r is None else "diverged" if diverged(r["curve"])
                      else f"{r['curve'][-1]:.4f}" for r in runs]
            rounds = max((len(r["curve"]) - 1 for r in runs if r is not None), default=0)
            body.append([row.label, f"{lr:g}", f"{step:g}", str(rounds), *losses,
                         "chosen" if row.choice.point == (lr, step) else ""])
    seeds = [f"seed {s}" for s in tune_seeds]
    return (f"# Tuning grid of {table.name} (global held-out loss on the tuning seeds' own "
            "data; each point's last rung)\n\n"
            + markdown(["row", "client lr", "server step", "rounds", *seeds, ""], body))


def table_markdown(table: TableSpec, rows: list[Row], cfg: CompareConfig, claims: list[dict],
                   runs: int, seconds: float, budgets_md: str) -> str:
    wanted = len(rows) * len(table.seeds)
    have = sum(len(r.runs) for r in rows)
    status = ("complete" if have == wanted else
              f"**partial: {have} of {wanted} evaluation runs finished**")
    t = table.horizons
    text = (f"# {table.title}\n\n"
            f"Task {cfg.task}; condition: {table.condition}. Evaluation seeds "
            f"{list(table.seeds)}, horizons {t[0]} / {t[1]} / {t[2]} rounds (loss every round), "
            f"tuned at {t[1]} rounds on seeds {list(cfg.tune_seeds)} by successive halving "
            f"(every point to {max(1, round(cfg.rung * t[1]))} rounds, the best "
            f"{cfg.keep:.0%} to {t[1]}). N = {cfg.num_clients} (all participate), "
            f"H = {cfg.local_steps}, batch {cfg.batch_size}, alpha = {cfg.lora_alpha:g}, "
            f"r = {cfg.rank}. Status: {status}; {runs} runs, {seconds:.0f} s of training "
            f"(sum of the runs' wall times, 1 torch thread each).\n\n"
            + row_table(table, rows) + "\n## Claims\n\n" + claims_note(claims)
            + claim_table(claims)
            + f"\nThe whole tuning grid: `{table.name}.grid.md`.\n")
    return text + (f"\n## Client budgets from device profiles\n\n{budgets_md}" if budgets_md
                   else "")


def claims_note(claims: list[dict]) -> str:
    """What the claim columns mean: one tuning horizon for all three, Holm over the task."""
    family = max((c["family"] for c in claims), default=0)
    return ("Every row is tuned once, at the middle horizon (\"rows tuned at\"), and that "
            "choice is evaluated at all three horizons. \"p\" is the paired t-test's two-sided "
            f"p-value; \"p (Holm)\" is Holm's adjustment over the task's {family} tested claim x "
            "horizon cells (verdicts.md), and \"verdict (Holm)\" decides where it is <= 0.05. A "
            "cell whose row diverged by that horizon (a seed's loss non-finite or above its "
            "start) says `diverged` and is left out of the family.\n\n")


def verdict_table(results: list[tuple[TableSpec, str, list[dict]]]) -> str:
    """The study's verdicts: claim x condition (task, horizon, training) -> verdict."""
    body = [[f"{c['a']} < {c['b']}", task_name, table.condition, *claim_cells(c)]
            for table, task_name, claims in results for c in claims]
    return markdown(["claim a < b", "task", "condition", *CLAIM_HEAD], body)


def study(cfg: CompareConfig, cache: RunCache) -> list[tuple[TableSpec, list[Row], list[dict]]]:
    """Every table of cfg: its rows tuned and evaluated (from the cache or trained), its claims,
    Holm-corrected over all of them (so over the task's when cfg names no tables)."""
    spec = task_spec(cfg)
    out = []
    for table in build_tables(cfg):
        rows = {r.label: evaluate_row(r, table, cfg, cache, spec) for r in table.rows}
        out.append((table, list(rows.values()), claim_results(table, rows)))
    holm_correct([(table, claims) for table, _, claims in out])
    return out


def run_compare(cfg: CompareConfig, train: bool = True, figures: bool = True) -> Path:
    """Run (or replay) the study of cfg.task and write its runs, tables, grids, figures and
    verdicts.md into cfg.out_dir/TASK/."""
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU
    out = Path(cfg.out_dir) / cfg.task
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(desc=f"compare {cfg.task}: runs trained", disable=not train)
    cache = RunCache(out / "runs.jsonl", [COMMITTED / cfg.task / "runs.jsonl"], train, bar)
    start = time.perf_counter()
    results = study(cfg, cache)
    bar.close()
    if cfg.tables:  # Holm's family and verdicts.md are the task's: replay the rest, train none
        cache.train = False
        results = study(replace(cfg, tables=()), cache)
    budgets_md = budget_table(task(cfg), cfg)[0]
    for table, rows, claims in results:
        if table.name not in cfg.table_names:
            continue
        runs = [r for row in rows for r in row.runs] + [
            r for row in rows for rs in row.grid.values() for r in rs if r is not None]
        text = table_markdown(table, rows, cfg, claims, len(runs),
                              sum(r["wall"] for r in runs),
                              budgets_md if table.name == "main" else "")
        write_atomic(out / f"{table.name}.md", text)
        write_atomic(out / f"{table.name}.grid.md", grid_table(table, rows, cfg.tune_seeds))
        if figures:
            draw(table, rows, out)
    write_atomic(out / "verdicts.md",
                 verdict_table([(t, cfg.task, c) for t, _, c in results]))
    wall = time.perf_counter() - start
    if cache.trained:
        log_sitting(out / "sittings.jsonl", cfg.table_names, wall, cache.trained)
    print(f"compare {cfg.task}: {wall:.0f} s wall, {cache.trained} runs "
          f"trained ({cache.trained_seconds:.0f} s), the rest replayed; wrote {out}/")
    return out


def log_sitting(path: Path, tables: tuple[str, ...], wall: float, trained: int) -> None:
    """Append what one training `compare` cost (wall and this process's CPU seconds) to the
    task's sittings log, the source of the READMEs' wall-time table."""
    record = {"tables": list(tables), "wall_s": round(wall), "cpu_s": round(time.process_time()),
              "runs_trained": trained, "finished": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                 time.gmtime())}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def draw(table: TableSpec, rows: list[Row], out: Path) -> None:
    """Curves (mean and band over seeds) of the rows that have runs; coverage for the main table."""
    from fslora_min import plots_compare  # matplotlib only when writing figures

    done = [r for r in rows if r.runs]
    if not done:
        return
    tmp = out / f".{table.name}.{os.getpid()}.png"
    plots_compare.plot_curves(done, table.title, tmp)
    tmp.replace(out / f"{table.name}.png")
    with_coverage = [r for r in done if r.label in ("fslora", "hetlora", "fslora-topk",
                                                    "fslora-importance")
                     and all("coverage" in run for run in r.runs)]
    if table.name == "main" and with_coverage:
        plots_compare.plot_coverage(with_coverage, f"How often each rank index was trained: "
                                    f"{table.title}", tmp)
        tmp.replace(out / "coverage.png")


# ------------------------------------------------------------------------------------- READMEs

README_BLOCKS = {COMMITTED / "README.md": ("answer", "verdicts", "status", "sittings"),
                 COMMITTED.parents[1] / "README.md": ("summary",)}


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- study:{name} -->\n)(.*?)(<!-- /study:{name} -->)", re.S)


def readme_blocks(forest: Path | None = None) -> dict[str, str]:
    """{block name: its text}, every number from the committed runs (the default study,
    replayed without training); with `forest`, the answer's forest plot drawn there."""
    verdicts, status, summary, logged = [], [], [], []
    for task_name in STUDY_TASKS:
        cfg = CompareConfig(task=task_name)
        cache = RunCache(Path(os.devnull), [COMMITTED / task_name / "runs.jsonl"], train=False)
        logged += [run for runs in cache.runs.values() for run in runs]
        for table, rows, claims in study(cfg, cache):
            verdicts.append((table, task_name, claims))
            runs = [r for row in rows for r in row.runs]
            tuning = [r for row in rows for rs in row.grid.values() for r in rs if r is not None]
            wanted = len(rows) * len(table.seeds)
            rounds = sum(len(r["curve"]) - 1 for r in runs + tuning)
            seconds = sum(r["wall"] for r in runs + tuning)
            status.append([f"`{table.name}`", task_name, f"{len(runs)} of {wanted}",
                           str(len(tuning)), str(planned_rounds(table, cfg)), str(rounds),
                           f"{seconds:.0f}", f"{seconds / rounds:.2f}" if rounds else "-"])
            summary += [[f"{c['a']} < {c['b']}", task_name, table.condition, str(c["rounds"]),
                         *(claim_cells(c)[i] for i in (3, 5)), c["verdict"]]
                        for c in claims if c["horizon"] == "long"
                        and table.name in ("main", "planted_small")]
    sittings = [[", ".join(f"`{t}`" for t in r["tables"]), task_name, r["finished"],
                 duration(r["wall_s"]), f"{r['cpu_s']} s", str(r["runs_trained"])]
                for task_name in STUDY_TASKS
                for r in read_jsonl(COMMITTED / task_name / "sittings.jsonl")]
    rounds, seconds = sum(len(r["curve"]) - 1 for r in logged), sum(r["wall"] for r in logged)
    cpu = sum(r["cpu_s"] for t in STUDY_TASKS for r in read_jsonl(COMMITTED / t / "sittings.jsonl"))
    if forest is not None:
        answer.plot_forest(verdicts, forest)
    return {"answer": answer.answer_paragraph(verdicts), "verdicts": verdict_table(verdicts),
            "status": markdown(["table", "task", "evaluation runs", "tuning runs",
                                "planned rounds", "rounds run", "training s", "s / round"],
                               status)
            + f"\nEvery committed run ({len(logged)} in the three logs, runs no table uses "
              f"included): {rounds} rounds, {seconds:.0f} s of training summed over the runs' "
              f"wall times ({seconds / 3600:.1f} h; each run on 1 thread of a shared, contended "
              f"CPU, so not CPU time); the sittings below that trained them used {cpu} s of CPU "
              f"({cpu / 3600:.1f} h).\n",
            "sittings": markdown(["tables", "task", "finished", "wall", "CPU (user + system)",
                                  "runs trained"], sittings),
            "summary": markdown(["claim a < b", "task", "condition", "rounds (long horizon)",
                                 "a - b [95% CI]", "p (Holm)", "verdict (Holm)"], summary)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def duration(seconds: float) -> str:
    """'1 h 32 min 51 s', '8 min 0 s', '51 s': from the largest unit that is not 0."""
    h, rest = divmod(round(seconds), 3600)
    parts = [(h, "h"), *zip(divmod(rest, 60), ("min", "s"))]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{v} {u}" for v, u in parts)


def fill_blocks(text: str, blocks: dict[str, str], names: tuple[str, ...]) -> str:
    """`text` with each named `<!-- study:NAME -->` block replaced; an error if one is missing."""
    for name in names:
        pattern = block_pattern(name)
        if not pattern.search(text):
            raise ValueError(f"no <!-- study:{name} --> block to fill")
        text = pattern.sub(lambda m: m.group(1) + blocks[name] + m.group(3), text)
    return text


def update_readmes() -> None:
    """Rewrite the study's blocks in results/compare/README.md and README.md."""
    blocks = readme_blocks(forest=COMMITTED / "forest.png")
    for path, names in README_BLOCKS.items():
        write_atomic(path, fill_blocks(path.read_text(), blocks, names))
        print(f"wrote {', '.join(names)} into {path}")
