"""The closed-form fixed points of theory/sketch_bias.py beside the planted-rank task's runs.

The planted task (fslora_min/planted.py) changes ONE layer by a rank-R* update whose directions
all move the layer's output equally: in whitened units a flat spectrum, sigma_l = 1 for
l <= R*. sketch_bias.py predicts, for least squares on such a target, the fraction of the
planted change each method leaves unlearnt at its fixed point:

    predicted(method) = excess_loss(method) / excess_loss(nothing learnt) = 2 excess / sum sigma^2.

The transformer is not least squares, so the comparable measured number is the fraction of the
loss gap each method leaves at the long horizon (300 rounds; each row's plateau test is
printed), seed by seed:

    measured(method, s) = (L_method(s) - L_ref(s)) / (L_0(s) - L_ref(s)),

with L_0 the loss before round 1 (the base model: nothing of the change learnt) and L_ref the
`planted_ladder` table's rank-R* FedAvg-LoRA (every client trains every rank) on the same seed.
Only the teacher's targets are scored (fslora_min/planted.py), so the gap is the planted
change's. This is a comparison, not a check: the prediction assumes least squares, whitened
inputs and a method run to its fixed point. What it can show is whether the methods ORDER as
predicted: Spearman's rank correlation is printed against the goal SPEARMAN_GOAL. Methods the
closed forms do not cover are left out.

    python -m theory.planted_check   # reads results/compare/planted/runs.jsonl; trains nothing
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fslora_min.study.compare import study  # noqa: E402
from fslora_min.study.config import COMMITTED, CompareConfig  # noqa: E402
from fslora_min.study.runs import RunCache  # noqa: E402
from fslora_min.study.protocol import paired_interval, plateau, spearman  # noqa: E402
from theory.report import save_figure, script_parser  # noqa: E402
from theory.sketch_bias import FIXED_POINT_METHODS, predicted_fixed_point  # noqa: E402

TABLES = ("planted_small", "planted_ratios")
SPEARMAN_GOAL = 0.7


def predicted_fraction(method: str, planted_rank: int, rank: int,
                       client_ranks: tuple[int, ...]) -> float:
    """2 excess / sum sigma^2 at the fixed point, on the flat spectrum sigma_l = 1, l <= R*."""
    spectrum = np.ones(planted_rank)
    point = predicted_fixed_point(method, spectrum, rank, client_ranks)
    return 2 * point.excess_loss / float((spectrum ** 2).sum())


def measured_fractions(curves: dict[int, list[float]], reference: dict[int, list[float]],
                       horizon: int) -> list[float]:
    """(L(s) - L_ref(s)) / (L_0(s) - L_ref(s)) at `horizon` over the seeds both rows have."""
    return [(curves[s][horizon] - reference[s][horizon]) / (curves[s][0] - reference[s][horizon])
            for s in sorted(set(curves) & set(reference))]


def compare_tables(runs_file: Path) -> list[dict]:
    """One record per (table, method) with runs: predicted and measured fraction left."""
    cfg = CompareConfig(task="planted")
    cache = RunCache(Path(os.devnull), [runs_file], train=False)
    results = {table.name: (table, rows) for table, rows, _ in study(cfg, cache)}
    ladder_table, ladder = results["planted_ladder"]
    top = next((r for r in ladder if r.label == f"r={cfg.planted.rank}"), None)
    if top is None or len(top.runs) < 2:
        return []
    reference = {r["seed"]: r["curve"] for r in top.runs}
    out = []
    for name in TABLES:
        table, rows = results[name]
        for row in rows:
            # fedavg-full ignores the client ranks: it is the reference row itself (0 by definition)
            if (row.label not in FIXED_POINT_METHODS or row.label == "fedavg-full"
                    or len(row.runs) < 2):
                continue
            ranks = tuple(row.runs[0]["client_ranks"])
            fractions = measured_fractions({r["seed"]: r["curve"] for r in row.runs}, reference,
                                           table.horizons[2])
            if len(fractions) < 2:
                continue
            curves = [r["curve"][:table.horizons[2] + 1] for r in row.runs]
            out.append({"table": name, "method": row.label, "seeds": len(fractions),
                        "predicted": predicted_fraction(row.label, cfg.planted.rank, cfg.rank,
                                                        ranks),
                        "measured": paired_interval(fractions), "rounds": table.horizons[2],
                        "plateau": sum(plateau(c) for c in curves)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--runs", default=str(COMMITTED / "planted" / "runs.jsonl"),
                        help="the planted task's run log (default: the committed study's)")
    args = parser.parse_args(argv)
    records = compare_tables(Path(args.runs))
    if not records:
        print("no planted_small / planted_ratios rows with >= 2 evaluation seeds and the "
              "ladder's reference row yet: nothing to compare")
        return 0
    print(f"{'table':<15} {'method':<12} {'seeds':>5} {'predicted':>9}  measured [95% CI] at "
          f"round {records[0]['rounds']}  seeds at a plateau")
    for r in records:
        m = r["measured"]
        print(f"{r['table']:<15} {r['method']:<12} {r['seeds']:>5} {r['predicted']:>9.3f}  "
              f"{m.mean:.3f} [{m.low:.3f}, {m.high:.3f}]  {r['plateau']} of {r['seeds']}")
    fig, axes = plt.subplots(1, len(TABLES), figsize=(6 * len(TABLES), 4.5), squeeze=False)
    for ax, name in zip(axes[0], TABLES):
        mine = [r for r in records if r["table"] == name]
        for r in mine:
            m = r["measured"]
            ax.errorbar(r["predicted"], m.mean, yerr=[[m.mean - m.low], [m.high - m.mean]],
                        fmt="o", capsize=3)
            ax.annotate(r["method"], (r["predicted"], m.mean), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        rho = spearman([r["predicted"] for r in mine], [r["measured"].mean for r in mine])
        if len(mine) >= 3 and math.isfinite(rho):
            print(f"{name}: Spearman rank correlation of predicted and measured = {rho:+.2f} "
                  f"({len(mine)} methods; goal >= {SPEARMAN_GOAL}: "
                  f"{'met' if rho >= SPEARMAN_GOAL else 'NOT met'})")
        ax.plot([0, 1], [0, 1], ls=":", color="0.6")
        ax.set(xlabel="predicted fraction left (least-squares fixed point)",
               ylabel="measured fraction of the gap left (95% CI)",
               title=f"{name}" + (f": Spearman {rho:+.2f}" if len(mine) >= 3 else ""))
    save_figure(fig, args.figures, "planted_prediction.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
