"""Tuning and evaluating one row: successive halving over its grid on the tuning seeds, then
the chosen point on every evaluation seed (the protocol: fslora_min/study/compare.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fslora_min.experiment import ExperimentConfig
from fslora_min.study.config import CompareConfig
from fslora_min.study.protocol import Choice, choose, diverged, widen
from fslora_min.study.runs import RunCache
from fslora_min.study.tables import RowSpec, TableSpec

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
         cache: RunCache) -> tuple[Choice, dict]:
    """Successive halving over the row's grid, widened once past an edge (module docstring)."""
    lrs, steps = list(row.lr_grid), list(row.step_grid)
    rung = max(1, round(cfg.rung * middle))
    grid: dict[tuple[float, float], list[dict | None]] = {}

    def score(point: tuple[float, float], rounds: int) -> float:
        runs = [cache.get(with_run(row.exp, s, *point, rounds)) for s in tune_seeds]
        grid[point] = runs
        if any(r is None for r in runs):
            return math.nan  # missing (no training): the choice waits for it
        if any(diverged(r["curve"]) for r in runs):
            return math.inf
        return float(np.mean([r["curve"][-1] for r in runs]))

    def halve(lrs: list[float], steps: list[float]) -> Choice | None:
        """Every point to the rung, the best `keep` of them to the middle horizon; None while
        a run is missing (no training): the choice waits for it."""
        points = [(lr, g) for lr in lrs for g in steps]
        first = {p: score(p, rung) for p in points}
        if any(math.isnan(s) for s in first.values()):
            return None
        ranked = sorted((p for p in points if math.isfinite(first[p])), key=first.get)
        survivors = ranked[:max(1, math.ceil(cfg.keep * len(points)))]
        final = {p: score(p, middle) for p in survivors} if rung < middle else first
        if any(math.isnan(s) for s in final.values()):
            return None
        return choose(final | {p: math.inf for p in points if p not in final}, lrs, steps)

    choice = halve(lrs, steps)
    if choice is not None:
        # on an edge, widen once past it; every point diverged: the steps that learn lie below
        edges = ("lowest lr", "lowest server step") if choice.point is None else choice.edges
        if edges:
            choice = halve(widen(lrs, edges, "lr", 3.0), widen(steps, edges, "server step", 2.0))
    return (Choice(None, ("tuning incomplete",)) if choice is None else choice), grid


def evaluate_row(row: RowSpec, table: TableSpec, cfg: CompareConfig, cache: RunCache) -> Row:
    choice, grid = tune(row, cfg.tune_seeds, table.horizons[1], cfg, cache)
    if choice.point is None:
        return Row(row.label, choice, grid, [])
    runs = [cache.get(with_run(row.exp, s, *choice.point, table.horizons[2]))
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
