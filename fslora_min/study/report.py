"""The study's Markdown: each table's rows and claims, its tuning grid, the verdicts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from fslora_min.study.config import CompareConfig
from fslora_min.study.protocol import diverged, diverged_seeds, plateau
from fslora_min.study.tables import TableSpec
from fslora_min.study.tuning import Row


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
