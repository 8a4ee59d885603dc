"""Rank collapse, measured on the linear task (issue 30, item 5).

    python -m fslora_min.study.rank_energy     # replays results/linear/energy.jsonl, trains what is missing

For each method at the mixed client ranks (fslora_min/study/linear_study.py's MIXED), the singular
values of the global update W - W0 every 10 rounds. raFLoRA (arXiv 2602.13486) reports that
with rank-agnostic aggregation the update's energy concentrates in the smallest shared rank and
the higher ranks are suppressed geometrically over rounds. Against a flat target a method that
has not collapsed spreads its energy like the target; `collapsed` compares the share of the
final update's energy in its top min_i k_i singular values with the target's share.
It writes results/linear/rank_energy.md and rank_energy.png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from fslora_min.study.linear_study import BASE, OUT, cached_run

METHODS = ("fslora", "hetlora", "flexlora", "raflora", "flora", "fedavg-min", "fedavg-full",
           "fed-plora")
EVERY = 10


def top_share(values: list[float], k: int) -> float:
    """sum_{l <= k} mu_l^2 / sum_l mu_l^2: the energy share of the top k singular values."""
    e = np.asarray(values) ** 2
    return float(e[:k].sum() / e.sum()) if e.sum() > 0 else float("nan")


def collapsed(values: list[float], k: int, target_share: float) -> bool:
    """The update holds over twice the target's share of its energy in its top k values."""
    return top_share(values, k) > 2 * target_share


def main() -> None:
    argparse.ArgumentParser(prog="python -m fslora_min.study.rank_energy", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, r_star = min(BASE.client_ranks), BASE.target_rank
    target_share = k / r_star  # flat spectrum
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharey=True)
    lines = ["| method | top-%d share of the energy (target %.3f) | singular values > 0.5 | "
             "collapsed |" % (k, target_share), "|---|---|---|---|"]
    verdicts = {}
    for ax, method in zip(axes.flat, METHODS):
        spectra = cached_run(replace(BASE, method=method), OUT / "energy.jsonl",
                             EVERY)["spectra"]
        rounds = sorted(int(t) for t in spectra)
        values = np.array([spectra[str(t)] if str(t) in spectra else spectra[t]
                           for t in rounds])[:, :r_star]
        ax.plot(rounds, values)
        ax.set(title=method, xlabel="round", ylabel="singular values of W - W0")
        final = values[-1].tolist()
        verdicts[method] = collapsed(final, k, target_share)
        lines.append(f"| {method} | {top_share(final, k):.3f} | "
                     f"{sum(v > 0.5 for v in final)} of {r_star} | "
                     f"{'yes' if verdicts[method] else 'no'} |")
    fig.suptitle(f"Linear task, k_i = {','.join(map(str, BASE.client_ranks))}, r = "
                 f"{BASE.rank}, flat rank-{r_star} target (sigma = 1): the update's top "
                 f"{r_star} singular values over rounds")
    fig.tight_layout()
    fig.savefig(OUT / "rank_energy.png", dpi=100)
    plt.close(fig)
    yes = [m for m, c in verdicts.items() if c] or ["none"]
    no = [m for m, c in verdicts.items() if not c] or ["none"]
    text = (f"# Rank collapse on the linear task\n\nWritten by "
            f"`python -m fslora_min.study.rank_energy` from `energy.jsonl` (the configuration "
            f"of `predictions.md`, mixed ranks, the update's singular values every {EVERY} "
            f"rounds). Collapsed (over twice the target's share of the energy in the top min "
            f"k_i = {k} values): {', '.join(yes)}; not collapsed: {', '.join(no)}. "
            "(FedAvg-LoRA at rank min k_i holds that rank by construction; FlexLoRA's "
            "collapse is the one raFLoRA's paper "
            "describes: index l keeps only its coverage's share each round, and raFLoRA's "
            "renormalisation removes it. FSLoRA does not collapse: its sketch shrinks every "
            "index alike, the penalty of theory/sketch_bias.py.) Whether collapse explains "
            "the language-model verdicts is not measured here: no per-rank energy was recorded "
            "on the planted or language-model tasks.\n\n" + "\n".join(lines)
            + "\n\n![singular values over rounds](rank_energy.png)\n")
    (OUT / "rank_energy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
