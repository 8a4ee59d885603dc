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
3. Claims "a < b": the paired difference L_a(s) - L_b(s) over the seeds, its 95% t-interval,
   p-value and verdict at the short, middle and long horizon, Holm-corrected over the task's
   claims x horizons (a cell where a row diverged is marked and left out of the family).

Every run is cached (RunCache) under a key of exactly what can change its numbers (the whole
experiment config but the output folder, the task, CODE_VERSION); a run to T rounds also serves
any shorter horizon (nothing before round t depends on T). The committed study's runs
(results/compare/TASK/runs.jsonl) are read first, so rerunning it replays it without training.
Each task writes into a folder of its own (OUT/TASK/): its runs, tables, grids, figures, verdicts.
"""


from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from fslora_min.study.config import COMMITTED, CompareConfig, task
from fslora_min.study.planted_report import preconditions
from fslora_min.study.profiles import budget_table
from fslora_min.study.protocol import (NOT_REPRODUCED, REPRODUCED, diverged_seeds, holm,
                                       paired_interval, verdict)
from fslora_min.study.report import grid_table, table_markdown, verdict_table, write_atomic
from fslora_min.study.runs import RunCache
from fslora_min.study.tables import TableSpec, build_tables
from fslora_min.study.tuning import Row, evaluate_row


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


def study(cfg: CompareConfig, cache: RunCache) -> list[tuple[TableSpec, list[Row], list[dict]]]:
    """Every table of cfg: its rows tuned and evaluated (from the cache or trained), its claims,
    Holm-corrected over all of them (so over the task's when cfg names no tables)."""
    out = []
    for table in build_tables(cfg):
        rows = {r.label: evaluate_row(r, table, cfg, cache) for r in table.rows}
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
    for name, text in table_files(cfg, results).items():
        write_atomic(out / name, text)
    if figures:
        for table, rows, _ in results:
            if table.name in cfg.table_names:
                draw(table, rows, out)
    if cfg.task == "planted":
        table, rows, _ = next(r for r in results if r[0].name == "planted_ladder")
        write_atomic(out / "preconditions.md", preconditions(cfg, rows, table.horizons[2]))
    wall = time.perf_counter() - start
    if cache.trained:
        log_sitting(out / "sittings.jsonl", cfg.table_names, wall, cache.trained)
    print(f"compare {cfg.task}: {wall:.0f} s wall, {cache.trained} runs "
          f"trained ({cache.trained_seconds:.0f} s), the rest replayed; wrote {out}/")
    return out


def table_files(cfg: CompareConfig, results: list[tuple[TableSpec, list[Row], list[dict]]]
                ) -> dict[str, str]:
    """{file name: text}: NAME.md and NAME.grid.md of each table cfg names, and the task's
    verdicts.md (a test compares them with the committed study's files)."""
    budgets_md = budget_table(task(cfg))[0]
    files = {}
    for table, rows, claims in results:
        if table.name not in cfg.table_names:
            continue
        runs = [r for row in rows for r in row.runs] + [
            r for row in rows for rs in row.grid.values() for r in rs if r is not None]
        files[f"{table.name}.md"] = table_markdown(table, rows, cfg, claims, len(runs),
                                                   sum(r["wall"] for r in runs),
                                                   budgets_md if table.name == "main" else "")
        files[f"{table.name}.grid.md"] = grid_table(table, rows, cfg.tune_seeds)
    files["verdicts.md"] = verdict_table([(t, cfg.task, c) for t, _, c in results])
    return files


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
