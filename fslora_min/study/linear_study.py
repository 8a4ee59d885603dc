"""Predicted vs measured fixed points on the linear task (fslora_min/linear.py).

    python -m fslora_min.study.linear_study      # replays results/linear/runs.jsonl, trains what is missing
    python -m fslora_min.study.linear_study --quick --out /tmp/lin   # 5 rows, 60 rounds (tests)

For every row: the fraction of the planted target left at the method's fixed point, as
theory/sketch_bias.py predicts it (identical clients, whitened inputs, full participation) and
as the run measures it (mean over the last tenth of the rounds, with `linear.settled` as the
plateau test); the rows whose method has no closed form there are measured only. It writes
results/linear/predictions.md (the table, the largest gap and Spearman's correlation against the
goals: every gap <= 0.02, Spearman >= 0.9) and results/linear/prediction.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from fslora_min.linear import (LinearConfig, measured_fraction, run_linear, settled, spectrum)
from fslora_min.study.protocol import spearman
from fslora_min.study.report import write_atomic
from fslora_min.study.runs import cached_record
from theory.sketch_bias import FIXED_POINT_METHODS, predicted_fixed_point

VERSION = 1  # bump when a change alters any run's numbers
OUT = Path(__file__).resolve().parents[2] / "results" / "linear"
GAP_GOAL, SPEARMAN_GOAL = 0.02, 0.9
BASE = LinearConfig()
MIXED = BASE.client_ranks  # the paper's ratios 1/8, 1/4, 1/2, 3/4 of r = 16, one client each
QUICK_METHODS, QUICK_ROUNDS = ("fslora", "hetlora", "flexlora", "flora", "raflora"), 60


def rows() -> list[tuple[str, LinearConfig]]:
    """(label, config): FSLoRA at each ratio (every client alike) and at the mixed ratios, and
    at a smaller r; the baselines and the newer methods at the mixed ratios; FSLoRA with
    heterogeneous clients. (k = 1 is left out: there kappa = 1, the sketched objective is flat
    along splits of one singular value, and the closed form's fixed point is not unique.)"""
    out = [(f"fslora k={k} r=16", replace(BASE, client_ranks=(k,) * 4)) for k in MIXED]
    out.append(("fslora k=4 r=8", replace(BASE, rank=8, alpha=8.0, client_ranks=(4,) * 4)))
    for method in ("fslora", "hetlora", "flexlora", "flora", "fedavg-min", "fedavg-full",
                   "raflora", "fed-plora", "flasc", "ffa-lora", "rolora", "fedex-lora"):
        out.append((f"{method} k=2,4,8,12", replace(BASE, method=method)))
    for lr, rounds in ((0.01, 3000), (0.005, 6000), (0.0025, 12000)):  # the small-step limit
        out.append((f"fslora k=2,4,8,12 lr {lr:g}, {rounds} rounds",
                    replace(BASE, lr=lr, rounds=rounds)))
    out.append(("fslora k=2,4,8,12 heterogeneous 0.1", replace(BASE, heterogeneity=0.1)))
    return out


def predicted(cfg: LinearConfig) -> float | None:
    """sketch_bias's fraction of the target left, or None (no closed form: a method it does not
    cover, or heterogeneous clients)."""
    sigma = spectrum(cfg)
    if cfg.heterogeneity or cfg.method not in (*FIXED_POINT_METHODS, "raflora"):
        return None
    if cfg.method == "raflora":  # derived here: FlexLoRA's map with each index renormalised
        kept = min(max(cfg.client_ranks), len(sigma))  # has fixed point sigma_l, l <= max k_i
        return float((sigma[kept:] ** 2).sum() / (sigma ** 2).sum())
    fp = predicted_fixed_point(cfg.method, sigma, cfg.rank, cfg.client_ranks, lr=cfg.lr,
                               local_steps=cfg.local_steps, alpha=cfg.alpha)
    return fp.excess_loss / (0.5 * float((sigma ** 2).sum()))


def key(cfg: LinearConfig, record_every: int = 0) -> str:
    """SHA-256 of the config's canonical JSON (with the version; the recording when on)."""
    extra = {"record_every": record_every} if record_every else {}
    return hashlib.sha256(json.dumps({"version": VERSION, **asdict(cfg), **extra},
                                     sort_keys=True).encode()).hexdigest()


def cached_run(cfg: LinearConfig, log: Path, record_every: int = 0) -> dict:
    """The run of cfg from the log, or trained and appended to it."""
    return cached_record(log, key(cfg, record_every), lambda: run_linear(cfg, record_every))


def smallest_steps(results: list[tuple]) -> list[tuple]:
    """The predicted rows, one per configuration (all but lr and rounds): the smallest lr's."""
    best: dict[tuple, tuple] = {}
    for row in results:
        cfg = row[1]
        if row[2] is None:
            continue
        same = (cfg.method, cfg.rank, cfg.client_ranks, cfg.heterogeneity)
        if same not in best or cfg.lr < best[same][1].lr:
            best[same] = row
    return list(best.values())


def table(results: list[tuple[str, LinearConfig, float | None, float, bool]]) -> str:
    lines = ["| row | method | r | k_i | predicted left | from | measured left | gap | "
             "at fixed point |", "|---|---|---|---|---|---|---|---|---|"]
    for label, cfg, pred, meas, flat in results:
        gap = "-" if pred is None else f"{abs(meas - pred):.4f}"
        source = ("-" if pred is None else "derived here (raflora.py)"
                  if cfg.method == "raflora" else "theory/sketch_bias.py")
        lines.append(f"| {label} | {cfg.method} | {cfg.rank} | "
                     f"{','.join(map(str, cfg.client_ranks))} | "
                     f"{'no closed form' if pred is None else f'{pred:.4f}'} | {source} | "
                     f"{meas:.4f} | {gap} | {'yes' if flat else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    for label, _, pred, meas, _ in results:
        if pred is not None:
            ax.plot(pred, meas, "o")
            ax.annotate(label, (pred, meas), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="predicted fraction of the target left (theory/sketch_bias.py)",
           ylabel="measured (mean of the last 10% of rounds)",
           title="Linear task: fixed points, predicted vs measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_rows() -> list[tuple[str, LinearConfig]]:
    """The study in miniature (`compare --quick` and the tests): a few methods at the mixed
    ratios, QUICK_ROUNDS rounds (far from any fixed point: it checks the code path only)."""
    return [(f"{m} k=2,4,8,12", replace(BASE, method=m, rounds=QUICK_ROUNDS))
            for m in QUICK_METHODS]


def study_results(out: Path = OUT, quick: bool = False
                  ) -> list[tuple[str, LinearConfig, float | None, float, bool]]:
    """(label, config, predicted, measured, at fixed point) per row, the runs from the log
    out/runs.jsonl (trained and logged when missing)."""
    results = []
    for label, cfg in quick_rows() if quick else rows():
        curve = cached_run(cfg, out / "runs.jsonl")["curve"]
        results.append((label, cfg, predicted(cfg), measured_fraction(curve), settled(curve)))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fslora_min.study.linear_study",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=quick_rows.__doc__)
    args = parser.parse_args(argv)
    write_study(Path(args.out), args.quick)


def write_study(out: Path, quick: bool = False) -> None:
    """Train (or replay) the rows, print them and write out/predictions.md and its figure."""
    out.mkdir(parents=True, exist_ok=True)
    results = study_results(out, quick)
    for label, _, pred, meas, flat in results:
        print(f"{label:40s} predicted {pred}  measured {meas:.4f}  at fixed point {flat}")
    goal = smallest_steps(results)
    worst = max(abs(m - p) for _, _, p, m, _ in goal)
    rho = spearman([p for _, _, p, _, _ in goal], [m for _, _, _, m, _ in goal])
    verdict = "met" if worst <= GAP_GOAL and rho >= SPEARMAN_GOAL else "NOT met"
    every = max(abs(m - p) for _, _, p, m, _ in results if p is not None)
    summary = (f"Over the {len(goal)} predicted configurations, each at its smallest step "
               f"(lr): largest gap {worst:.4f} (goal <= {GAP_GOAL}), Spearman {rho:.3f} (goal "
               f">= {SPEARMAN_GOAL}): goals {verdict}. Over every predicted row, larger steps "
               f"included, the largest gap is {every:.4f}. Rows at their fixed point (plateau "
               f"test): {sum(r[4] for r in results)} of {len(results)}.\n")
    print(summary)
    cfg = results[0][1]
    head = (f"# The linear task: predicted vs measured fixed points\n\n"
            f"Written by `python -m fslora_min.study.linear_study` from `runs.jsonl`. One LoRA "
            f"layer ({cfg.m} x {cfg.n}, W0 = 0), a planted rank-{cfg.target_rank} target with a "
            f"{cfg.spectrum} spectrum, whitened inputs ({cfg.samples} rows), "
            f"{len(cfg.client_ranks)} identical clients all participating, full-batch SGD at "
            f"lr {cfg.lr}, H = {cfg.local_steps}, alpha = {cfg.alpha:g}, {cfg.rounds} rounds "
            f"(unless a row says otherwise), "
            f"seed {cfg.seed}. \"left\": ||W - W*||^2 / ||W*||^2; measured: its mean over the "
            f"last 10% of rounds; \"at fixed point\": that mean moved by <= 0.002 from the 10% "
            f"before.\n\n{summary}\n")
    write_atomic(out / "predictions.md",
                 head + table(results) + "\n![predicted vs measured](prediction.png)\n")
    plot(results, out / "prediction.png")


if __name__ == "__main__":
    main()
