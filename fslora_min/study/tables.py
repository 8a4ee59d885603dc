"""The study's tables: for each, its rows (an experiment config and the grids it is tuned
over), the claims "a < b" it tests, its seeds and horizons."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fslora_min.experiment import ExperimentConfig
from fslora_min.ranks import PAPER_RATIOS, ranks_from_ratios
from fslora_min.registry import make_method
from fslora_min.server import ServerConfig
from fslora_min.study.config import (BASELINES, IMPORTANCE_METHODS, RECENT_METHODS,
                                     CompareConfig, task)
from fslora_min.study.profiles import budget_table


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


def server_steps(method: str, grid: tuple[float, ...]) -> tuple[float, ...]:
    """The server-step grid of a method's row: eta_g = 1 alone when its server sets the global
    factors itself (FlexLoRA's SVD, FLoRA's merge) instead of stepping them by eta_g D."""
    return grid if make_method(method, 1, torch.Generator()).server_step else (1.0,)


def method_rows(exp: ExperimentConfig, lrs: tuple[float, ...], steps: tuple[float, ...],
                methods: tuple[str, ...]) -> list[RowSpec]:
    """One row per method, each on `exp`, its server-step grid as `server_steps` gives it."""
    return [RowSpec(m, replace(exp, method=m), lrs, server_steps(m, steps)) for m in methods]


def vs_baselines(rows: list[RowSpec], a: str = "fslora") -> list[tuple[str, str]]:
    """The paper's claims "a < b" for every baseline b among `rows`."""
    return [(a, r.label) for r in rows if r.label in BASELINES]


def global_rank_table(name: str, title: str, sgd: ExperimentConfig, cfg: CompareConfig,
                      seeds: tuple[int, ...], horizons: tuple[int, int, int]) -> TableSpec:
    """Global rank r = 4, 8, 16 with every client at k_i = 4."""
    k = 4
    rows = [RowSpec(f"r={k * c}", replace(sgd, client_ranks=[k] * cfg.num_clients,
                                          lora=replace(sgd.lora, rank=k * c)),
                    cfg.lr_grid, cfg.server_lr_grid) for c in (1, 2, 4)]
    return TableSpec(name, title.format(k=k), "SGD clients, eta_g tuned", rows,
                     [("r=16", "r=4")], seeds, horizons)


def with_adamw(sgd: ExperimentConfig) -> ExperimentConfig:
    """`sgd` with AdamW clients, their k_i from AdamW's own memory (its two moments)."""
    adamw = replace(sgd, client=replace(sgd.client, optimizer="adamw"))
    return replace(adamw, client_ranks=budget_table(adamw)[1])


def build_tables(cfg: CompareConfig) -> list[TableSpec]:
    """The task's tables: their rows (configs and grids), claims, seeds and horizons. Each row's
    clients get their k_i from the device profiles (fslora_min/study/profiles.py)."""
    base = task(cfg)
    sgd = replace(base, client_ranks=budget_table(base)[1])
    if cfg.task == "planted":  # its adapters are too small for the profiles to bind: the ratios
        tables = planted_tables(cfg, replace(base, client_ranks=ranks_from_ratios(
            list(PAPER_RATIOS), cfg.num_clients, cfg.rank)))
    else:
        tables = method_tables(cfg, sgd) + convention_tables(cfg, sgd)
    return [t for t in tables if t.name in cfg.table_names]


def planted_tables(cfg: CompareConfig, exp: ExperimentConfig) -> list[TableSpec]:
    """The planted task's: the rank ladder, small client ranks, the paper's ratios, the methods
    published since, global r; all on the decisive tables' seeds and horizons (the task exists
    to test the mechanism, so its runs go to the long horizon)."""
    full = (cfg.seeds, cfg.horizons)
    avg_grid, methods = cfg.server_lr_grid, cfg.methods
    ladder = [RowSpec(f"r={r}", replace(exp, method="fedavg-full",
                                        client_ranks=[r] * cfg.num_clients,
                                        lora=replace(exp.lora, rank=r)),
                      cfg.lr_grid, avg_grid) for r in sorted({2, 4, cfg.planted.rank})]
    small = replace(exp, client_ranks=[1 + i % 4 for i in range(cfg.num_clients)])
    small_rows = method_rows(small, cfg.lr_grid, avg_grid, methods)
    ratio_rows = method_rows(exp, cfg.lr_grid, avg_grid, methods)
    recent_rows = method_rows(exp, cfg.lr_grid, avg_grid, RECENT_METHODS)
    return [
        TableSpec("planted_ladder", f"Planted rank {cfg.planted.rank}: FedAvg-LoRA, every "
                  f"client at rank r", "SGD clients, eta_g tuned, every client k = r",
                  ladder, [(hi.label, lo.label) for lo, hi in zip(ladder, ladder[1:])], *full),
        TableSpec("planted_small", "Planted rank: small client ranks k_i = 1, 2, 3, 4",
                  "SGD clients, eta_g tuned, k_i <= 4", small_rows, vs_baselines(small_rows),
                  *full),
        TableSpec("planted_ratios", "Planted rank: the paper's ratios k_i / r = 1/8, 1/4, 1/2, "
                  "3/4",
                  "SGD clients, eta_g tuned, k_i = 2, 4, 8, 12", ratio_rows,
                  vs_baselines(ratio_rows), *full),
        TableSpec("planted_recent", "Planted rank: FSLoRA against the methods published since",
                  "SGD clients, eta_g tuned, k_i = 2, 4, 8, 12", recent_rows,
                  [("fslora", m) for m in RECENT_METHODS[1:]], *full, paper=False),
        global_rank_table("planted_global_rank", "Planted rank: global rank r, every client "
                          "k_i = {k}", exp, cfg, *full)]


def method_tables(cfg: CompareConfig, sgd: ExperimentConfig) -> list[TableSpec]:
    """FSLoRA against the baselines (and the later methods) under each training condition."""
    full, reduced = (cfg.seeds, cfg.horizons), (cfg.reduced_seeds, cfg.reduced_horizons)
    avg_grid, adam_grid, methods = cfg.server_lr_grid, cfg.adam_server_lr_grid, cfg.methods
    adamw = with_adamw(sgd)
    main_rows = method_rows(sgd, cfg.lr_grid, avg_grid, methods)
    adamw_rows = method_rows(adamw, cfg.adamw_lr_grid, avg_grid, methods)
    recent_rows = method_rows(sgd, cfg.lr_grid, avg_grid, RECENT_METHODS)
    adam_exp = replace(sgd, server=ServerConfig(optimizer="adam"))
    coverage = replace(sgd, server=ServerConfig(aggregation="coverage"))
    pair = tuple(m for m in ("fslora", "hetlora") if m in methods)
    return [
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
    ]


def convention_tables(cfg: CompareConfig, sgd: ExperimentConfig) -> list[TableSpec]:
    """The conventions the paper leaves open: HetLoRA's scale, lr scaling, the authors' own
    setup, importance-based index sets, the global rank, the sketching ratio."""
    reduced = (cfg.reduced_seeds, cfg.reduced_horizons)
    avg_grid, adam_grid = cfg.server_lr_grid, cfg.adam_server_lr_grid
    adamw = with_adamw(sgd)
    adamw_rows = method_rows(adamw, cfg.adamw_lr_grid, avg_grid, cfg.methods)
    published = RowSpec("fslora as published", replace(
        adamw, method="fedavg-full", client=replace(adamw.client, weight_decay=0.01),
        lora=replace(adamw.lora, rslora=True),
        server=ServerConfig(optimizer="adamw", weight_decay=0.01)), cfg.adamw_lr_grid, adam_grid)
    ratio_rows = [RowSpec(f"k/r={ratio:g}", replace(
        sgd, client_ranks=[max(1, round(ratio * cfg.rank))] * cfg.num_clients), cfg.lr_grid,
        avg_grid)
        for ratio in PAPER_RATIOS]
    imp_rows = method_rows(sgd, cfg.lr_grid, avg_grid, IMPORTANCE_METHODS)
    hetlora_rows = method_rows(sgd, cfg.lr_grid, avg_grid, ("fslora", "hetlora",
                                                             "hetlora-rescaled"))
    ratio_lr = replace(sgd, client=replace(sgd.client, lr_scaling="ratio"))
    lr_rows = [RowSpec("fslora", replace(sgd, method="fslora"), cfg.lr_grid, avg_grid),
               RowSpec("fslora lr x k_i/r", replace(ratio_lr, method="fslora"), cfg.lr_grid,
                       avg_grid),
               RowSpec("hetlora lr x k_i/r", replace(ratio_lr, method="hetlora"), cfg.lr_grid,
                       avg_grid)]
    return [
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
        global_rank_table("global_rank", "Global rank r, every client k_i = {k}", sgd, cfg,
                          *reduced),
        TableSpec("sketch_ratio", f"Sketching ratio k/r (every client the same), r = {cfg.rank}",
                  "SGD clients, eta_g tuned", ratio_rows, [("k/r=0.75", "k/r=0.25")], *reduced),
    ]
