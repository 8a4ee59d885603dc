"""Rank collapse, measured on the linear and planted tasks (issue 30, item 5).

    python -m fslora_min.study.rank_energy                 # linear: results/linear/energy.jsonl
    python -m fslora_min.study.rank_energy --task planted  # results/compare/planted/energy.jsonl

Each replays its energy.jsonl and trains (records) what is missing from it.

raFLoRA (arXiv 2602.13486) reports that with rank-agnostic aggregation the update's energy
concentrates in the smallest shared rank and the higher ranks are suppressed geometrically over
rounds. Against a flat target a method that has not collapsed spreads its energy like the
target; `collapsed` compares the share of the final update's energy in its top min_i k_i
singular values with the target's share.

- linear (here): each method at the mixed client ranks (fslora_min/study/linear_study.py's
  MIXED), the singular values of the global update W - W0 every 10 rounds. Writes
  results/linear/.
- planted (fslora_min/study/planted_energy.py): the planted layer of each tuned row of the
  planted method tables, in weight and whitened units and index by index.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fslora_min.linear import spectrum
from fslora_min.study.linear_study import BASE, OUT, cached_run
from fslora_min.study.report import markdown

METHODS = ("fslora", "hetlora", "flexlora", "raflora", "flora", "fedavg-min", "fedavg-full",
           "fed-plora")
EVERY = 10


def top_share(values: list[float], k: int) -> float:
    """sum_{l <= k} mu_l^2 / sum_l mu_l^2: the energy share of the top k singular values (of
    the first k entries, for any other list of magnitudes)."""
    e = np.asarray(values) ** 2
    return float(e[:k].sum() / e.sum()) if e.sum() > 0 else float("nan")


def collapsed(values: list[float], k: int, target_share: float) -> bool:
    """The update holds over twice the target's share of its energy in its top k values."""
    return top_share(values, k) > 2 * target_share


def update_spectrum(weight: torch.Tensor, w0: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                    scale: float, root: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of the update W - W0 = (W0' - W0) + s B A, largest first, in float64:
    W0' is the layer's frozen weight now (FLoRA and FedEx-LoRA merge into it), W0 the base's.
    B (m, r), A (r, n); the update is (m, n). With `root` = Sigma^{1/2} (n, n), those of
    (W - W0) Sigma^{1/2}: the update in whitened units, where the planted target is flat."""
    delta = weight.double() - w0.double() + scale * B.double() @ A.double()  # (m, n)
    return torch.linalg.svdvals(delta if root is None else delta @ root.double())


def index_energy(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """e_j = s ||B[:, j]|| ||A[j, :]|| (r,), in float64: the Frobenius norm of rank index j's
    term s B[:, j] A[j, :], so where raFLoRA's collapse puts the energy shows index by index."""
    return scale * B.double().norm(dim=0) * A.double().norm(dim=1)  # (r,)


def collapse_table(finals: dict[str, list[float]], k: int, target_share: float, floor: float,
                   extra: dict[str, list[str]]) -> tuple[str, dict[str, bool]]:
    """Per method: the top-k share of its final update's energy (its top R* singular values,
    R* the target's rank), how many exceed `floor` (half the target's smallest), collapsed or
    not, then `extra`'s columns (header -> one cell per method); and the verdicts."""
    verdicts = {m: collapsed(v, k, target_share) for m, v in finals.items()}
    rows = [[m, f"{top_share(v, k):.3f}", f"{sum(x > floor for x in v)} of {len(v)}",
             "yes" if verdicts[m] else "no"] for m, v in finals.items()]
    for cells in extra.values():
        rows = [row + [cell] for row, cell in zip(rows, cells)]
    head = ["method", f"top-{k} share of the energy (target {target_share:.3f})",
            f"singular values > {floor:.3g}", "collapsed", *extra]
    return markdown(head, rows), verdicts


def draw_spectra(panels: dict[str, tuple[list[int], np.ndarray]], title: str, path: Path,
                 target: list[float] | None = None) -> None:
    """One panel per method: its update's singular values (rounds, R*) over rounds; `target`'s
    as black ticks at the last round (the planted target's are not all alike)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(16, 3.5 * rows), sharey=True, squeeze=False)
    for ax, (method, (rounds, values)) in zip(axes.flat, panels.items()):
        ax.plot(rounds, values)
        if target is not None:
            ax.plot([rounds[-1]] * len(target), target, "k_", ms=10)
        ax.set(title=method, xlabel="round", ylabel="singular values of W - W0")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def split(verdicts: dict[str, bool]) -> tuple[str, str]:
    """The collapsed methods and the others, each as a comma-separated list ("none": empty)."""
    return tuple(", ".join([m for m, c in verdicts.items() if c is want] or ["none"])
                 for want in (True, False))


def linear() -> None:
    """The linear task: every method of METHODS from results/linear/energy.jsonl."""
    k, r_star = min(BASE.client_ranks), BASE.target_rank
    target_share = top_share(spectrum(BASE), k)
    panels = {}
    for method in METHODS:
        spectra = cached_run(replace(BASE, method=method), OUT / "energy.jsonl",
                             EVERY)["spectra"]
        rounds = sorted(int(t) for t in spectra)
        panels[method] = (rounds, np.array([spectra[str(t)] if str(t) in spectra else spectra[t]
                                            for t in rounds])[:, :r_star])
    table, verdicts = collapse_table({m: v[-1].tolist() for m, (_, v) in panels.items()}, k,
                                     target_share, 0.5 * min(spectrum(BASE)), {})
    draw_spectra(panels, f"Linear task, k_i = {','.join(map(str, BASE.client_ranks))}, r = "
                 f"{BASE.rank}, flat rank-{r_star} target (sigma = 1): the update's top "
                 f"{r_star} singular values over rounds", OUT / "rank_energy.png")
    yes, no = split(verdicts)
    text = (f"# Rank collapse on the linear task\n\nWritten by "
            f"`python -m fslora_min.study.rank_energy` from `energy.jsonl` (the configuration "
            f"of `predictions.md`, mixed ranks, the update's singular values every {EVERY} "
            f"rounds). Collapsed (over twice the target's share of the energy in the top min "
            f"k_i = {k} values): {yes}; not collapsed: {no}. "
            "(FedAvg-LoRA at rank min k_i holds that rank by construction; FlexLoRA's "
            "collapse is the one raFLoRA's paper "
            "describes: index l keeps only its coverage's share each round, and raFLoRA's "
            "renormalisation removes it. FSLoRA does not collapse: its sketch shrinks every "
            "index alike, the penalty of theory/sketch_bias.py.) The planted task's "
            "recordings, and whether collapse explains its verdicts: "
            "results/compare/planted/rank_energy.md (`--task planted`).\n\n" + table
            + "\n![singular values over rounds](rank_energy.png)\n")
    (OUT / "rank_energy.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fslora_min.study.rank_energy",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("linear", "planted"), default="linear",
                        help="which task's collapse (default: %(default)s)")
    parser.add_argument("--study", default=None,
                        help="planted: the folder of the study whose runs.jsonl gives each row's "
                             "tuned point and committed curves (default: results/compare/planted)")
    args = parser.parse_args()
    if args.task == "linear":
        linear()
    else:
        from fslora_min.study import planted_energy  # it builds on this module's rule

        planted_energy.planted(Path(args.study) if args.study else planted_energy.PLANTED_OUT)


if __name__ == "__main__":
    main()
