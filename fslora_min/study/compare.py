"""The reproduction study: each claim of the paper (arXiv 2501.19389, section 5) against the
baselines, with a verdict and the conditions under which it holds (statistics:
fslora_min/study/protocol.py).

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

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from fslora_min.study.config import COMMITTED, CompareConfig, task
from fslora_min.study.profiles import budget_table
from fslora_min.study.protocol import NOT_REPRODUCED, REPRODUCED, paired_interval, verdict
from fslora_min.study.report import grid_table, table_markdown, verdict_table, write_atomic
from fslora_min.study.runs import RunCache
from fslora_min.study.tables import TableSpec, build_tables
from fslora_min.study.tuning import Row, evaluate_row

def claim_results(table: TableSpec, rows: dict[str, Row]) -> list[dict]:
    """Per claim and horizon: the paired difference's interval and verdict (None: < 2 seeds)."""
    out = []
    for a, b in table.claims:
        ra = {r["seed"]: r["curve"] for r in rows[a].runs}
        rb = {r["seed"]: r["curve"] for r in rows[b].runs}
        seeds = sorted(set(ra) & set(rb))
        for name, h in zip(("short", "middle", "long"), table.horizons):
            p = paired_interval([ra[s][h] - rb[s][h] for s in seeds]) if len(seeds) >= 2 else None
            word = verdict(p) if p else "pending"
            if not table.paper:  # no claim to reproduce: say which row is lower
                word = {REPRODUCED: f"{a} lower", NOT_REPRODUCED: f"{b} lower"}.get(word, word)
            out.append({"a": a, "b": b, "horizon": name, "rounds": h, "seeds": len(seeds),
                        "paired": p, "verdict": word})
    return out


def study(cfg: CompareConfig, cache: RunCache) -> list[tuple[TableSpec, list[Row], list[dict]]]:
    """Every table of cfg: its rows tuned and evaluated (from the cache or trained), its claims."""
    out = []
    for table in build_tables(cfg):
        rows = {r.label: evaluate_row(r, table, cfg, cache) for r in table.rows}
        out.append((table, list(rows.values()), claim_results(table, rows)))
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
    budgets_md = budget_table(task(cfg))[0]
    for table, rows, claims in results:
        runs = [r for row in rows for r in row.runs] + [
            r for row in rows for rs in row.grid.values() for r in rs if r is not None]
        text = table_markdown(table, rows, cfg, claims, len(runs),
                              sum(r["wall"] for r in runs),
                              budgets_md if table.name == "main" else "")
        write_atomic(out / f"{table.name}.md", text)
        write_atomic(out / f"{table.name}.grid.md", grid_table(table, rows, cfg.tune_seeds))
        if figures:
            draw(table, rows, out)
    if cfg.tables:  # verdicts.md holds every table of the task: replay the others, train none
        cache.train = False
        results = study(replace(cfg, tables=()), cache)
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
    from fslora_min.study import plots as plots_compare  # matplotlib only when writing figures

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
