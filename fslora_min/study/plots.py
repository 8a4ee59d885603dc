"""Figures of a comparison: held-out curves per configuration, and rank-index coverage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fslora_min.plots import draw_coverage, expected_count  # noqa: E402


def plot_curves(rows: list, title: str, path: Path) -> None:
    """Global held-out loss against round (mean over seeds, band = min..max), and final accuracy.
    (theory/planted_check.py draws the theory's predictions beside the planted task's runs.)"""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for row in rows:
        curves = np.array([r["curve"] for r in row.runs])  # (seeds, rounds + 1)
        mean = curves.mean(0)
        axes[0].plot(mean, label=f"{row.label} (lr {row.lr:g}, step {row.server_lr:g})")
        axes[0].fill_between(range(len(mean)), curves.min(0), curves.max(0), alpha=0.2)
    axes[0].set(xlabel="round", ylabel="global held-out loss",
                title=f"loss (mean, band: min..max over {len(rows[0].runs)} seeds)")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    # accuracy is measured at a run's last round only: a run cut from a longer one has none here
    accs = [[r["acc"] for r in row.runs if "acc" in r] for row in rows]
    axes[1].bar(range(len(rows)), [np.mean(a) if a else np.nan for a in accs],
                yerr=[np.std(a) if a else 0.0 for a in accs], color="tab:green", capsize=3)
    axes[1].set_xticks(range(len(rows)), [f"{row.label}\n({len(a)} of {len(row.runs)} seeds)"
                                          for row, a in zip(rows, accs)],
                       rotation=30, ha="right", fontsize=7)
    axes[1].set(ylabel="final next-token accuracy",
                title="accuracy (mean ± std; runs that ended at this horizon)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coverage(rows: list, title: str, path: Path) -> None:
    """Times each rank index j of each module was trained, summed over seeds, one panel a
    method, all on one colour scale (so the methods' spreads compare at a glance)."""
    covs = []
    for row in rows:
        names = list(row.runs[0]["coverage"])
        covs.append((names, sum(np.array([r["coverage"][n] for n in names])
                                for r in row.runs)))  # (modules, r)
    vmax = max(cov.max() for _, cov in covs)
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows) + 1.5, 5), squeeze=False,
                             layout="constrained")
    for ax, row, (names, cov) in zip(axes[0], rows, covs):
        im = draw_coverage(ax, cov, names, vmax)
        ax.set_title(f"{row.label}: {cov.min()} .. {cov.max()}\n"
                     f"expected under uniform sketches: {expected_count(cov):.0f}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="times trained (all rounds, clients, seeds)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
