"""Sketches: which of the r global rank indices a client trains this round (docs/method.md, 1).

A sketch for client i is the r x r diagonal matrix

    S = (r / k_i) * sum_{j in I} e_j e_j^T,     I a uniform k_i-subset of {0, ..., r-1},

so E[S] = I_r (unbiased) and E[S^2] = (r / k_i) I_r. Code never builds S densely: a `Sketch`
is the pair (index set I, sketch weight r / k_i). Baselines and ablations give other diagonal
values: one number for every index (HetLoRA's 1.0), or one per index (the importance rule's
1 / pi_j, fslora_min/importance.py). One index set is drawn per (client, round, module) and
shared by that module's B and A (a pitfall of public code draws them separately).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fslora_min.rng import randperms

def check_rank_pair(r: int, k: int) -> None:
    """Raise a ValueError naming the value unless 1 <= k <= r."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"global rank r must be a positive integer, got r={r!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= r:
        raise ValueError(f"sketch size k must be an integer with 1 <= k <= r={r}, got k={k!r}")


@dataclass(frozen=True)
class Sketch:
    """The index set I (k distinct ranks out of r) and its diagonal values (r / k by default)."""

    indices: torch.Tensor  # I: (k,) int64, distinct values in [0, r)
    rank: int  # r, the global rank the indices refer to
    # The diagonal value(s) at I: None means r / k (unbiased for a uniform I); a float is one
    # value for every index; a (k,) tensor is one value per index, in the order of `indices`.
    weight: float | torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_rank_pair(self.rank, int(self.indices.numel()))
        if self.indices.dtype != torch.int64 or self.indices.dim() != 1:
            raise ValueError(f"sketch index must be a 1-D int64 tensor, got {self.indices.dtype} "
                             f"of shape {tuple(self.indices.shape)}")
        index = self.indices.detach().cpu().numpy()  # host checks: no device op, no sync
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= self.rank:
            raise ValueError(f"sketch index out of range [0, {self.rank}): min {lo}, max {hi}")
        if np.unique(index).size != index.size:
            raise ValueError(f"sketch index has repeated entries: {self.indices.tolist()}")
        if isinstance(self.weight, torch.Tensor):
            if self.weight.shape != self.indices.shape:
                raise ValueError(f"per-index sketch weights must have shape "
                                 f"{tuple(self.indices.shape)}, got {tuple(self.weight.shape)}")
            if not bool(torch.isfinite(self.weight).all() and (self.weight > 0).all()):
                raise ValueError(f"sketch weights must be positive and finite, "
                                 f"got {self.weight.tolist()}")
        elif self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"sketch weight must be positive and finite, got {self.weight!r}")

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def per_index(self) -> torch.Tensor | None:
        """The (k,) diagonal values when they differ per index, else None (use
        `sketch_weight`)."""
        return self.weight if isinstance(self.weight, torch.Tensor) else None

    @property
    def sketch_weight(self) -> float:
        """The value of each non-zero diagonal entry of S: r / k unless a weight was given."""
        if self.per_index is not None:
            raise ValueError("this sketch has one weight per index: use `per_index`")
        return self.rank / self.k if self.weight is None else self.weight

    def diagonal(self) -> torch.Tensor:
        """diag(S) as a dense (r,) float64 vector: for tests and theory, never for training."""
        d = torch.zeros(self.rank, dtype=torch.float64)
        d[self.indices] = (self.sketch_weight if self.per_index is None
                           else self.per_index.to(torch.float64))
        return d


def sample_index_sets(r: int, k: int, count: int,
                      generator: torch.Generator) -> list[torch.Tensor]:
    """`count` independent uniform k-subsets of range(r), each sorted: every subset has
    probability 1 / C(r, k). Each is the first k of a torch.randperm(r) (fslora_min/rng.py
    draws them all at once, number for number)."""
    check_rank_pair(r, k)
    return [torch.from_numpy(row) for row in np.sort(randperms(r, count, generator)[:, :k], 1)]


def sample_index_set(r: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A uniform k-subset of range(r), sorted."""
    return sample_index_sets(r, k, 1, generator)[0]


def sample_sketch(r: int, k: int, generator: torch.Generator) -> Sketch:
    """S = (r/k) sum_{j in I} e_j e_j^T with I uniform among the k-subsets of {0..r-1}."""
    return Sketch(sample_index_set(r, k, generator), r)


def sample_module_sketches(module_names: list[str], r: int, k: int,
                           generator: torch.Generator) -> dict[str, Sketch]:
    """One independent sketch per adapted module (docs/method.md section 3, step 2)."""
    indices = sample_index_sets(r, k, len(module_names), generator)
    return {name: Sketch(index, r) for name, index in zip(module_names, indices)}


def full_sketch(r: int) -> Sketch:
    """The identity sketch I = {0..r-1}, sketch weight 1: plain LoRA (k = r)."""
    return Sketch(torch.arange(r), r)
