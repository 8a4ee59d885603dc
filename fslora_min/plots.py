"""Figures of a federation: held-out curves, bytes moved, and rank-index coverage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fslora_min.federation import History  # noqa: E402


def module_labels(names: list[str]) -> list[str]:
    """Short heatmap row labels: 'blocks.0.attn.q' -> 'block 0: q' on a block's first row,
    then just the projection ('k', 'v', ...)."""
    labels, last = [], None
    for name in names:
        parts = name.split(".")
        block = parts[1] if parts[0] == "blocks" and len(parts) > 2 else name
        labels.append(f"block {block}: {parts[-1]}" if block != last else parts[-1])
        last = block
    return labels


def draw_coverage(ax: Axes, cov: np.ndarray, names: list[str], vmax: float) -> AxesImage:
    """Heatmap of how many times each rank index j (column) of each module (row) was trained,
    on the colour scale 0 .. vmax, with a line between transformer blocks."""
    im = ax.imshow(cov, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0,
                   vmax=vmax)
    labels = module_labels(names)
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    for row, label in enumerate(labels[1:], start=1):
        if label.startswith("block "):
            ax.axhline(row - 0.5, color="white", linewidth=1.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank index j")
    return im


def expected_count(cov: np.ndarray) -> float:
    """Times each index would be trained in expectation under uniform sketches: a client of
    rank k_i trains each of the r indices with probability k_i / r, and the k_i of all updates
    sum to the whole count, so the expectation is the mean over indices."""
    return float(cov.mean())


def plot_history(history: History, title: str, path: Path) -> None:
    """Four panels: global held-out loss and accuracy (each client's own in thin grey), KiB each
    client uploads per round, and how many times each rank index of each module was trained."""
    evaluated = [r for r in history.rounds if r.heldout_loss is not None]
    rounds = [0] + [r.round for r in evaluated]
    loss = [history.initial_loss] + [r.heldout_loss for r in evaluated]
    acc = [history.initial_acc] + [r.heldout_acc for r in evaluated]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_loss, ax_acc), (ax_up, ax_cov) = axes
    for ax, first, key in ((ax_loss, history.initial_client_loss, "client_heldout_loss"),
                           (ax_acc, history.initial_client_acc, "client_heldout_acc")):
        scored = [r for r in evaluated if getattr(r, key) is not None]  # FederationConfig
        per_round = [first] + [getattr(r, key) for r in scored]  # (rounds + 1, clients)
        if first:
            ax.plot([0] + [r.round for r in scored], per_round, color="0.75", linewidth=0.7,
                    label=["each client, on its own held-out set"] + ["_"] * (len(first) - 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.plot(rounds, loss, marker=".", label="global model, on the global held-out set")
    ax_loss.set(xlabel="round", ylabel="global held-out loss", title="loss")
    ax_acc.plot(rounds, acc, marker=".", color="tab:green",
                label="global model, on the global held-out set")
    ax_acc.set(xlabel="round", ylabel="next-token accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8)
    sent: dict[int, list[float]] = {}  # client -> KiB uploaded in each round it reported
    rank_of: dict[int, int] = {}
    for r in history.rounds:
        for client, k, b in zip(r.participants, r.client_ranks, r.bytes_up):
            rank_of[client] = k
            if client not in r.dropped:  # a dropped client sent nothing: not a 0-byte upload
                sent.setdefault(client, []).append(b / 1024)
    clients = sorted(sent)  # a client that never reported has no bar
    ax_up.bar(range(len(clients)), [np.mean(sent[c]) for c in clients], color="tab:orange")
    ax_up.set_xticks(range(len(clients)), [f"{c}\nk={rank_of[c]}" for c in clients], fontsize=8)
    ax_up.set(xlabel="client", ylabel="KiB per round", title="upload per client (grows with k_i)")
    names = list(history.coverage)
    if names:
        cov = np.array([history.coverage[n] for n in names])  # (modules, r)
        expected = expected_count(cov)
        im = draw_coverage(ax_cov, cov, names, cov.max())
        bar = fig.colorbar(im, ax=ax_cov, label="times trained")
        bar.ax.axhline(expected, color="red", linewidth=2)
        ax_cov.set_title(f"times each rank index was trained: {cov.min()} .. {cov.max()}\n"
                         f"(red on the scale: {expected:.1f}, expected under uniform sketches)")
    else:
        ax_cov.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
