"""The study's blocks in results/compare/README.md and README.md (answer, verdicts, status,
sittings, summary) and the answer's forest plot, every number from the committed runs:
`python -m fslora_min compare --readme`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fslora_min.study import answer
from fslora_min.study.compare import study
from fslora_min.study.config import COMMITTED, STUDY_TASKS, CompareConfig
from fslora_min.study.report import claim_cells, markdown, verdict_table, write_atomic
from fslora_min.study.runs import RunCache
from fslora_min.study.tuning import planned_rounds

README_BLOCKS = {COMMITTED / "README.md": ("answer", "verdicts", "holm", "status", "sittings"),
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
            "holm": decision_counts(verdicts),
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


def decision_counts(verdicts: list[tuple]) -> str:
    """Per task, the cells decided on their raw interval and after Holm's correction, and the
    diverged ones (a cell whose verdict is neither inconclusive nor pending is decided)."""
    def decided(word: str) -> bool:
        return word not in ("inconclusive", "pending") and not word.startswith("diverged")

    parts, gone = [], []
    for task_name in STUDY_TASKS:
        cells = [c for _, t, claims in verdicts if t == task_name for c in claims]
        parts.append(f"{task_name}: {sum(decided(c['raw']) for c in cells)} raw decisions, "
                     f"{sum(decided(c['verdict']) for c in cells)} after Holm")
        if n := sum(c["diverged"] for c in cells):
            gone.append(f"{n} {task_name} cell{'s' * (n > 1)} diverged")
    return "(" + "; ".join(parts + gone) + ")\n"


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
