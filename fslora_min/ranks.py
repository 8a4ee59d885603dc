"""Client ranks: the rank k_i each client trains, from sketching ratios k_i / r or a distribution.

- From a list of sketching ratios (the paper's {1/8, 1/4, 1/2, 3/4}), assigned to clients in
  turn: client i gets ratios[i % len(ratios)], and k_i = round(ratio * r).
- Drawn from a distribution over {1, ..., r}: "uniform"; "normal" (mean r/2, std r/4,
  redrawn until it lands in range: a truncated normal, never clipped); "heavy-small" (Zipf,
  P(k) proportional to 1/k: most clients are small, a few are large).
Every k_i is validated against r; a ratio that rounds to rank 0 is an error, not a clip.
"""

from __future__ import annotations

import math

import numpy as np

from fslora_min.rng import CLIENT_RANKS, numpy_rng
from fslora_min.sketch import check_rank_pair

DISTRIBUTIONS = ("uniform", "normal", "heavy-small")
PAPER_RATIOS = (1 / 8, 1 / 4, 1 / 2, 3 / 4)


def rank_from_ratio(ratio: float, r: int) -> int:
    """k = round(ratio * r) (halves round up) for a sketching ratio in (0, 1]."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(f"sketching ratio must be in (0, 1], got {ratio!r}")
    k = math.floor(ratio * r + 0.5)
    if k < 1:
        raise ValueError(f"sketching ratio {ratio!r} of global rank r={r} gives k={k}: "
                         f"use a ratio of at least {1 / r:.4g} or a larger r")
    return k  # <= r, as ratio <= 1


def ranks_from_ratios(ratios: list[float], num_clients: int, r: int) -> list[int]:
    """k_i for each client, taking the ratios in turn."""
    if not ratios:
        raise ValueError("the list of sketching ratios is empty")
    return [rank_from_ratio(ratios[i % len(ratios)], r) for i in range(num_clients)]


def ranks_from_distribution(kind: str, num_clients: int, r: int, seed: int) -> list[int]:
    """k_i drawn independently from a distribution over {1, ..., r}."""
    check_rank_pair(r, 1)
    rng = numpy_rng(seed, CLIENT_RANKS)
    support = np.arange(1, r + 1)
    if kind == "uniform":
        probs = np.full(r, 1.0 / r)
    elif kind == "normal":
        density = np.exp(-0.5 * ((support - r / 2) / (r / 4)) ** 2)
        probs = density / density.sum()  # the normal restricted to the support: truncated
    elif kind == "heavy-small":
        probs = (1.0 / support) / (1.0 / support).sum()
    else:
        raise ValueError(f"rank distribution must be one of {DISTRIBUTIONS}, got {kind!r}")
    return [int(k) for k in rng.choice(support, size=num_clients, p=probs)]


def validate_ranks(ranks: list[int], r: int) -> None:
    """Every k_i must satisfy 1 <= k_i <= r."""
    for i, k in enumerate(ranks):
        try:
            check_rank_pair(r, k)
        except ValueError as err:
            raise ValueError(f"client {i}: {err}") from None
