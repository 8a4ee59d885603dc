"""Figures of a federation: held-out curves, bytes moved, and rank-index coverage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fslora_min.federation import History  # noqa: E402


def plot_history(history: History, title: str, path: Path) -> None:
    """Four panels: global held-out loss and accuracy (each client's own in thin grey), KiB each
    client uploads per round, and how many times each rank index of each module was trained."""
    evaluated = [r for r in history.rounds if r.heldout_loss is not None]
    rounds = [0] + [r.round for r in evaluated]
    loss = [history.initial_loss] + [r.heldout_loss for r in evaluated]
    acc = [history.initial_acc] + [r.heldout_acc for r in evaluated]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, first, key in ((axes[0], history.initial_client_loss, "client_heldout_loss"),
                           (axes[1], history.initial_client_acc, "client_heldout_acc")):
        per_round = [first] + [getattr(r, key) for r in evaluated]  # (rounds + 1, clients)
        if first:
            ax.plot(rounds, per_round, color="0.75", linewidth=0.7)
    axes[0].plot(rounds, loss, marker=".")
    axes[0].set(xlabel="round", ylabel="global held-out loss", title="loss")
    axes[1].plot(rounds, acc, marker=".", color="tab:green")
    axes[1].set(xlabel="round", ylabel="next-token accuracy", title="accuracy")
    sent: dict[int, list[float]] = {}  # client -> KiB uploaded in each round it reported
    rank_of: dict[int, int] = {}
    for r in history.rounds:
        for client, k, b in zip(r.participants, r.client_ranks, r.bytes_up):
            rank_of[client] = k
            if client not in r.dropped:  # a dropped client sent nothing: not a 0-byte upload
                sent.setdefault(client, []).append(b / 1024)
    clients = sorted(sent)  # a client that never reported has no bar
    axes[2].bar(range(len(clients)), [np.mean(sent[c]) for c in clients], color="tab:orange")
    axes[2].set_xticks(range(len(clients)), [f"{c}\nk={rank_of[c]}" for c in clients], fontsize=7)
    axes[2].set(xlabel="client", ylabel="KiB per round", title="upload per client (grows with k_i)")
    names = list(history.coverage)
    if names:
        cov = np.array([history.coverage[n] for n in names])  # (modules, r)
        im = axes[3].imshow(cov, aspect="auto", cmap="viridis", interpolation="nearest")
        axes[3].set(xlabel="rank index j", ylabel="module", title="times each rank was trained")
        axes[3].set_yticks(range(len(names)), [n.replace("blocks.", "") for n in names],
                           fontsize=5)
        fig.colorbar(im, ax=axes[3])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
