"""A fair comparison of FSLoRA with its baselines, and ablations of the paper's empirical claims
(arXiv 2501.19389 v1, Section 5; docs/method.md section 7).

Fair by construction: every run of one seed uses the same base model (one cached pretraining),
the same data partition, the same client ranks k_i (from device profiles), the same sequence
of participants and the same minibatch order (named random streams, fslora_min/rng.py). Every
row of every table gets the same tuning budget: each local learning rate of `lr_grid` on a
tuning seed that is not an evaluation seed, chosen by the clients' own held-out loss (never
the global held-out set that the tables report); then the chosen lr on every evaluation seed.

Tables (Markdown) and figures (PNG) go to `out_dir`; every finished run is appended to
runs.jsonl, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from fslora_min.client import ClientConfig
from fslora_min.data import DataConfig
from fslora_min.experiment import ExperimentConfig, run_experiment
from fslora_min.federation import FederationConfig
from fslora_min.lora import LoRAConfig
from fslora_min.model import ModelConfig
from fslora_min.pretrain import PretrainConfig
from fslora_min.shakespeare import VOCAB, ShakespeareConfig
from fslora_min.tasks import TASKS
from fslora_min.profiles import (DEFAULT_PROFILES, budgets_from_profiles, memory_bytes,
                                 upload_bytes)

MAIN_METHODS = ("fslora", "hetlora", "flexlora", "flora", "fedavg-min", "fedavg-full", "fed-plora",
                "flasc", "ffa-lora", "rolora", "fedex-lora")
IMPORTANCE_METHODS = ("fslora", "fslora-topk", "fslora-importance")
TABLES = ("main", "global_rank", "sketch_ratio", "sketch_vs_nosketch")  # main: + importance


@dataclass
class CompareConfig:
    task: str = "synthetic"  # one of fslora_min.tasks.TASKS: the data every run learns from
    seeds: tuple[int, ...] = (0, 1, 2)  # evaluation seeds
    tune_seed: int = 100  # learning rates are chosen on this seed only
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # local learning rates
    optimizer: str = "sgd"  # the clients' optimizer: "sgd" or "adamw" (fresh state each round)
    tables: tuple[str, ...] = TABLES  # which tables (and figures) to produce
    rounds: int = 30  # T
    num_clients: int = 8  # N, all participating
    rank: int = 16  # r
    lora_alpha: float = 32.0
    local_steps: int = 5  # H
    batch_size: int = 8
    rank_ablation_k: int = 4  # every client's budget in the global-rank ablation
    rank_multiples: tuple[int, ...] = (1, 2, 4, 8)  # r = k, 2k, 4k, 8k
    ratio_sweep: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)  # every client's k/r
    pretrain_steps: int = 300
    out_dir: str = "results/compare"

    def __post_init__(self) -> None:
        if len(self.seeds) < 1 or not self.lr_grid:
            raise ValueError("need at least one seed and one learning rate")
        if not self.tables or set(self.tables) - set(TABLES):
            raise ValueError(f"tables must be a non-empty subset of {TABLES}, got {self.tables}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")


def quick_config(out_dir: str) -> CompareConfig:
    """Every table and figure in a few minutes: 2 seeds, 1 lr, 3 rounds, 4 clients."""
    return CompareConfig(seeds=(0, 1), lr_grid=(0.1,), rounds=3, num_clients=4,
                         rank_multiples=(1, 2), ratio_sweep=(1 / 4, 1.0), pretrain_steps=100,
                         out_dir=out_dir)


def task(cfg: CompareConfig) -> ExperimentConfig:
    """The tiny task: a 2-layer width-32 transformer, 12 LoRA modules, 16-token sequences (of
    the synthetic language, or 16-character windows of Shakespeare's roles)."""
    model = ModelConfig(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=32)
    data = DataConfig(vocab_size=32, seq_len=16, n_base_topics=4, successors=2, train_seqs=32,
                      heldout_seqs=8, global_heldout_seqs=64)
    if cfg.task == "shakespeare":
        model, data = replace(model, vocab_size=len(VOCAB)), ShakespeareConfig(seq_len=16)
    fed = FederationConfig(num_clients=cfg.num_clients, participants=cfg.num_clients,
                           rounds=cfg.rounds, eval_every=max(1, cfg.rounds // 10))
    return ExperimentConfig(model=model, data=data, federation=fed,
                            lora=LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha),
                            pretrain=PretrainConfig(steps=cfg.pretrain_steps, batch_size=32,
                                                    lr=1e-2),
                            client=ClientConfig(local_steps=cfg.local_steps,
                                                optimizer=cfg.optimizer,
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


def one_run(exp: ExperimentConfig, log: Path, done: dict[str, dict]) -> dict:
    """Run (or reload from runs.jsonl) one federation; return its summary."""
    key = json.dumps(asdict(exp), sort_keys=True)
    if key in done:
        return done[key]
    history, info = run_experiment(exp, progress=False)
    last = history.rounds[-1]
    evaluated = [r for r in history.rounds if r.heldout_loss is not None]
    summary = {
        "method": exp.method, "seed": exp.federation.seed, "lr": exp.client.lr,
        "rank": info["global_rank"], "rounds": exp.federation.rounds,
        "client_ranks": info["client_ranks"], "trained_ranks": info["trained_ranks"],
        "loss": _finite(last.heldout_loss), "acc": last.heldout_acc,
        "val_loss": _finite(float(np.mean(info["client_heldout_loss"]))),
        "curve": [[0, history.initial_loss]] + [[r.round, _finite(r.heldout_loss)]
                                                for r in evaluated],
        "bytes_down": float(np.mean([b for r in history.rounds for b in r.bytes_down])),
        "bytes_up": float(np.mean([b for r in history.rounds for b in r.bytes_up])),
        "bytes_up_total": float(sum(sum(r.bytes_up) for r in history.rounds)),
        "trainable": info["client_trainable_parameters"],
        "flops": [flops_per_local_step(exp, k) for k in info["trained_ranks"]],
        "wall": info["wall_seconds"], "coverage": history.coverage,
    }
    with log.open("a") as f:
        f.write(json.dumps({"key": key, "summary": summary}) + "\n")
    done[key] = summary
    return summary


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def tuned_runs(exp: ExperimentConfig, cfg: CompareConfig, log: Path, done: dict,
               bar: tqdm) -> tuple[float, list[dict], list[dict]]:
    """Tune the lr on the tuning seed (clients' held-out loss), then run every seed with it."""
    tuning = []
    for lr in cfg.lr_grid:
        tuning.append(one_run(with_seed_lr(exp, cfg.tune_seed, lr), log, done))
        bar.update()
    best = min(tuning, key=lambda s: s["val_loss"])["lr"]
    runs = []
    for seed in cfg.seeds:
        runs.append(one_run(with_seed_lr(exp, seed, best), log, done))
        bar.update()
    return best, runs, tuning


def with_seed_lr(exp: ExperimentConfig, seed: int, lr: float) -> ExperimentConfig:
    return replace(exp, federation=replace(exp.federation, seed=seed),
                   client=replace(exp.client, lr=lr))


@dataclass
class Row:
    label: str
    lr: float
    runs: list[dict]
    tuning: list[dict] = field(default_factory=list)


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def results_table(rows: list[Row], extra: dict[str, list[str]] | None = None) -> str:
    """Markdown: one row per configuration, mean ± std over the evaluation seeds."""
    head = ["config", "R", "k_i", "lr", "global loss", "global acc", "KiB down/client-round",
            "KiB up/client-round", "trainable/client", "MFLOP/local step", "wall s"]
    head += list(extra or {})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows):
        r0 = row.runs[0]
        ks = sorted(set(r0["trained_ranks"]))
        cells = [row.label, str(r0["rank"]), ",".join(map(str, ks)), f"{row.lr:g}",
                 mean_std([r["loss"] for r in row.runs]), mean_std([r["acc"] for r in row.runs]),
                 f"{r0['bytes_down'] / 1024:.1f}", f"{r0['bytes_up'] / 1024:.1f}",
                 f"{min(r0['trainable'])}..{max(r0['trainable'])}",
                 f"{min(r0['flops']) / 1e6:.1f}..{max(r0['flops']) / 1e6:.1f}",
                 f"{np.mean([r['wall'] for r in row.runs]):.1f}"]
        cells += [col[i] for col in (extra or {}).values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tuning_table(rows: list[Row]) -> str:
    """Clients' held-out loss on the tuning seed for every (row, lr): the selection evidence."""
    lrs = sorted({t["lr"] for row in rows for t in row.tuning})
    lines = ["| config | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " | chosen |",
             "|" + "---|" * (len(lrs) + 2)]
    for row in rows:
        by_lr = {t["lr"]: t["val_loss"] for t in row.tuning}
        lines.append(f"| {row.label} | " + " | ".join(f"{by_lr.get(lr, float('nan')):.4f}"
                                                       for lr in lrs) + f" | {row.lr:g} |")
    return "\n".join(lines) + "\n"


def budget_table(exp: ExperimentConfig, cfg: CompareConfig) -> tuple[str, list[int]]:
    """Each client's device budgets, its k_i, and the memory and upload that k_i uses."""
    shapes = module_shapes(exp)
    assigned = budgets_from_profiles(DEFAULT_PROFILES, cfg.num_clients, shapes, cfg.rank)
    lines = ["| client | device | memory budget (KiB) | upload budget (KiB/round) | k_i | "
             "memory used (KiB) | upload used (KiB/round) |", "|" + "---|" * 7]
    for i, (p, k) in enumerate(assigned):
        lines.append(f"| {i} | {p.name} | {p.memory_bytes / 1024:.1f} | "
                     f"{p.upload_bytes / 1024:.1f} | {k} | "
                     f"{memory_bytes(k, shapes, 4, exp.client.optimizer) / 1024:.1f} | "
                     f"{upload_bytes(k, shapes, 4) / 1024:.1f} |")
    return "\n".join(lines) + "\n", [k for _, k in assigned]


def run_compare(cfg: CompareConfig) -> Path:
    """All tables and figures of the comparison and its ablations."""
    from fslora_min import plots_compare  # matplotlib only when writing figures

    torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["summary"]
    base = task(cfg)
    budgets_md, client_ranks = budget_table(base, cfg)
    base = replace(base, client_ranks=client_ranks)
    sizes = {"main": len(MAIN_METHODS) + 2, "global_rank": len(cfg.rank_multiples),
             "sketch_ratio": len(cfg.ratio_sweep), "sketch_vs_nosketch": 3}
    n_rows = sum(sizes[t] for t in cfg.tables)
    total = n_rows * (len(cfg.lr_grid) + len(cfg.seeds))
    bar = tqdm(total=total, desc="compare runs")
    start = time.perf_counter()

    def rows_for(configs: list[tuple[str, ExperimentConfig]]) -> list[Row]:
        rows = []
        for label, exp in configs:
            bar.set_postfix_str(label)
            lr, runs, tuning = tuned_runs(exp, cfg, log, done, bar)
            rows.append(Row(label, lr, runs, tuning))
        return rows

    what = (f"{len(cfg.seeds)} seeds, {cfg.num_clients} clients, {cfg.rounds} rounds of "
            f"H = {cfg.local_steps}, r = {cfg.rank}, {cfg.optimizer}")  # for figure titles
    header = (f"seeds {list(cfg.seeds)} (lr tuned on seed {cfg.tune_seed} over "
              f"{list(cfg.lr_grid)} by the clients' held-out loss), T={cfg.rounds}, "
              f"N={cfg.num_clients} (all participate), H={cfg.local_steps}, "
              f"batch {cfg.batch_size}, client optimizer {cfg.optimizer}, "
              f"alpha={cfg.lora_alpha}, torch threads 1\n")
    sections = []
    if "main" in cfg.tables:
        methods = list(dict.fromkeys(MAIN_METHODS + IMPORTANCE_METHODS))
        by_method = {r.label: r for r in rows_for([(m, replace(base, method=m))
                                                   for m in methods])}
        sections += [("main", "FSLoRA against the baselines at the same client ranks k_i",
                      [by_method[m] for m in MAIN_METHODS], None),
                     ("importance", "Uniform index sets vs importance without / with "
                                    "reweighting", [by_method[m] for m in IMPORTANCE_METHODS],
                      None)]
        plots_compare.plot_coverage([by_method[m] for m in ("fslora", "hetlora", "fslora-topk",
                                                            "fslora-importance")],
                                    f"How often each rank index was trained ({what})",
                                    out / "coverage.png")
    sections += ablations(cfg, base, rows_for)
    bar.close()
    for name, title, rows, extra in sections:
        md = f"# {title}\n\n{header}\n" + results_table(rows, extra)
        md += "\n## Learning-rate tuning (clients' held-out loss, tuning seed)\n\n"
        md += tuning_table(rows)
        if name == "main":
            md += "\n## Client budgets from device profiles\n\n" + budgets_md
        (out / f"{name}.md").write_text(md)
        plots_compare.plot_curves(rows, f"{title}\n{what}", out / f"{name}.png")
    print(f"compare: {time.perf_counter() - start:.0f} s; wrote {out}/*.md and *.png")
    return out


def ablations(cfg: CompareConfig, base: ExperimentConfig,
              rows_for: Callable[[list[tuple[str, ExperimentConfig]]], list[Row]]) -> list[tuple]:
    """(name, title, rows, extra columns) of the requested ablations among cfg.tables."""
    k, sections = cfg.rank_ablation_k, []
    if "global_rank" in cfg.tables:
        rows = rows_for([(f"r={k * c}", replace(base, client_ranks=[k] * cfg.num_clients,
                                                lora=replace(base.lora, rank=k * c)))
                         for c in cfg.rank_multiples])
        sections.append(("global_rank", f"Global rank r, every client k_i = {k}", rows, None))
    if "sketch_ratio" in cfg.tables:
        rows = rows_for([(f"k/r={ratio:g}", replace(
                             base,
                             client_ranks=[max(1, round(ratio * cfg.rank))] * cfg.num_clients))
                         for ratio in cfg.ratio_sweep])
        sections.append(("sketch_ratio", f"Sketching ratio k/r (every client the same), "
                                         f"r = {cfg.rank}", rows, None))
    if "sketch_vs_nosketch" not in cfg.tables:
        return sections
    half = max(1, cfg.rank // 2)
    long_fed = replace(base.federation, rounds=2 * cfg.rounds,
                       eval_every=max(1, 2 * cfg.rounds // 10))
    sketch_rows = rows_for([
        (f"sketch r={cfg.rank} k={half}, 2T", replace(base, client_ranks=[half] * cfg.num_clients,
                                                      federation=long_fed)),
        (f"no sketch k=r={cfg.rank}, T", replace(base, client_ranks=[cfg.rank] * cfg.num_clients)),
        (f"no sketch k=r={half}, 2T", replace(base, client_ranks=[half] * cfg.num_clients,
                                              federation=long_fed,
                                              lora=replace(base.lora, rank=half))),
    ])
    upload = {"MiB up in total": [f"{np.mean([r['bytes_up_total'] for r in row.runs]) / 2**20:.2f}"
                                  for row in sketch_rows]}
    return sections + [("sketch_vs_nosketch", "Same total upload: sketching vs no sketching",
                        sketch_rows, upload)]
