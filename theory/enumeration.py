"""All sketches of one size, for exact expectations over S (docs/method.md section 1).

A k-sketch is uniform over the C(r, k) index sets, so for small r every expectation E_S[g(S)]
is the plain average of g over all of them: no sampling error at all.
"""

from __future__ import annotations

import itertools
import math

import torch

from fslora_min.sketch import Sketch


def all_index_sets(r: int, k: int) -> torch.Tensor:
    """Every k-subset of {0..r-1}, sorted: a (C(r, k), k) int64 tensor."""
    if math.comb(r, k) > 200_000:
        raise ValueError(f"C({r}, {k}) = {math.comb(r, k)} index sets is too many to enumerate")
    return torch.tensor(list(itertools.combinations(range(r), k)), dtype=torch.int64).view(-1, k)


def all_sketch_diagonals(r: int, k: int) -> torch.Tensor:
    """diag(S) for every k-sketch: (C(r, k), r) float64, entries r/k on I and 0 elsewhere."""
    return torch.stack([Sketch(index, r).diagonal() for index in all_index_sets(r, k)])
