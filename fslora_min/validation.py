"""The server's checks on a client update, before it touches the global model.

A client is untrusted: its upload may be wrong-shaped, carry NaN or Inf, name ranks it was not
sent, or repeat a rank (which would count one delta twice in the padded average). The server
knows what it sent each participant (the downlink: per module the index set I and the compact
factors b (m x k), a (k x n)), so it checks the upload against that:
  - the same modules, and the update is from the client it was sent to;
  - per module, an index set of k distinct int64 ranks in [0, r), equal to the one sent;
  - db of shape (m, k) and da of shape (k, n), floating point, every entry finite.
An update that fails any check is rejected whole, with the reason of the first check it fails;
the round goes on with the others (fslora_min/federation.py).

`screen_updates` checks a whole round at once: the index sets on host copies (the server's
own and the upload's), the shapes and types in Python, and the entries of every delta of a
module in one finiteness reduction per factor, read back in one host sync for the round.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import torch

from fslora_min.client import ClientUpdate
from fslora_min.lora import CompactFactors

# How many entries of a delta are not finite; `dim` is the dimension of length k (1 for db,
# 0 for da), along which a round's deltas of one module are laid side by side.
NonFinite = Callable[[torch.Tensor, int], int]


class BadUpdate(ValueError):
    """A client update the server refuses; the message says why."""


def count_nonfinite(delta: torch.Tensor, dim: int) -> int:
    """One delta's non-finite entries (NaN or Inf), read back at once (a host sync)."""
    return int((~torch.isfinite(delta)).sum())


def check_index(index: object, sent: torch.Tensor, r: int, where: str) -> None:
    """The index set must be k distinct int64 ranks in [0, r), the very set that was sent."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
        kind = (f"{index.dtype} tensor of shape {tuple(index.shape)}"
                if isinstance(index, torch.Tensor) else type(index).__name__)
        raise BadUpdate(f"{where}: index set must be a 1-D int64 tensor, got {kind}")
    if index.numel() != sent.numel():
        raise BadUpdate(f"{where}: index set has {index.numel()} ranks, {sent.numel()} were sent")
    got = index.detach().cpu().numpy()  # host copies: no device operation per check
    if got.size and (got.min() < 0 or got.max() >= r):
        raise BadUpdate(f"{where}: index out of range [0, {r}): {got.tolist()}")
    if np.unique(got).size != got.size:
        raise BadUpdate(f"{where}: repeated ranks in the index set {got.tolist()}")
    if not np.array_equal(got, sent.detach().cpu().numpy()):
        raise BadUpdate(f"{where}: index set {got.tolist()} is not the one sent, "
                        f"{sent.tolist()}")


def check_delta(delta: object, shape: tuple[int, int], dim: int, where: str,
                nonfinite: NonFinite = count_nonfinite) -> None:
    """A floating-point tensor of the downlink's shape with every entry finite."""
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
        kind = delta.dtype if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise BadUpdate(f"{where}: must be a floating-point tensor, got {kind}")
    if tuple(delta.shape) != shape:
        raise BadUpdate(f"{where}: shape {tuple(delta.shape)}, expected {shape}")
    bad = nonfinite(delta, dim)
    if bad:
        raise BadUpdate(f"{where}: {bad} non-finite entries (NaN or Inf)")


def check_update(update: ClientUpdate, client_id: int, sent: dict[str, CompactFactors],
                 r: int, nonfinite: NonFinite = count_nonfinite) -> None:
    """Raise BadUpdate naming the first problem of `update`, the answer to downlink `sent`."""
    who = f"client {client_id}"
    if update.client_id != client_id:
        raise BadUpdate(f"{who}: update claims to be from client {update.client_id}")
    for field, got in (("deltas", update.deltas), ("index sets", update.sketches)):
        if not isinstance(got, dict) or set(got) != set(sent):
            names = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise BadUpdate(f"{who}: {field} for modules {names}, expected {sorted(sent)}")
    for name, factors in sent.items():
        where = f"{who}, module {name}"
        check_index(getattr(update.sketches[name], "indices", None), factors.sketch.indices, r,
                    where)
        pair = update.deltas[name]
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise BadUpdate(f"{where}: deltas must be a pair (db, da)")
        check_delta(pair[0], tuple(factors.b.shape), 1, f"{where}, db", nonfinite)
        check_delta(pair[1], tuple(factors.a.shape), 0, f"{where}, da", nonfinite)


def nonfinite_counts(deltas: list[tuple[torch.Tensor, int]]) -> list[int]:
    """Each delta's non-finite entries: the deltas that can be laid side by side (same other
    dimension, dtype and device) are, one reduction each; one read-back for all of them."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (delta, dim) in enumerate(deltas):
        groups[(dim, delta.shape[1 - dim], delta.dtype, delta.device)].append(i)
    finite, order = [], []
    for (dim, _, _, _), members in groups.items():
        side = torch.cat([deltas[i][0] for i in members], dim)
        finite.append(torch.isfinite(side).sum(1 - dim))  # finite entries per column or row
        order += members
    per_line = torch.cat(finite).tolist() if finite else []  # the round's one host sync
    counts, start = [0] * len(deltas), 0
    for i in order:
        delta, dim = deltas[i]
        k = delta.shape[dim]
        counts[i] = delta.shape[1 - dim] * k - sum(per_line[start:start + k])
        start += k
    return counts


def screen_updates(updates: list[ClientUpdate], clients: list[int],
                   downlinks: list[dict[str, CompactFactors]], r: int,
                   ) -> tuple[list[int], list[tuple[int, str]]]:
    """Positions of the updates that pass `check_update`, and (client, reason) for the rest.

    Two passes of `check_update`: the first takes every entry as finite and notes which
    deltas its checks reach; their non-finite entries are counted for the round at once
    (`nonfinite_counts`); the second replays the checks with those counts, so each update
    gets the reason of the first check it fails, as one check_update would give it."""
    reached: list[list[tuple[torch.Tensor, int]]] = [[] for _ in updates]
    for pos, (update, client, sent) in enumerate(zip(updates, clients, downlinks)):
        try:
            check_update(update, client, sent, r,
                         lambda delta, dim, mine=reached[pos]: mine.append((delta, dim)) or 0)
        except BadUpdate:
            pass  # the second pass names it
    counts = iter(nonfinite_counts([d for mine in reached for d in mine]))
    per_update = [[next(counts) for _ in mine] for mine in reached]
    good, rejected = [], []
    for pos, (update, client, sent) in enumerate(zip(updates, clients, downlinks)):
        replay = iter(per_update[pos])
        try:
            check_update(update, client, sent, r, lambda delta, dim: next(replay))
            good.append(pos)
        except BadUpdate as err:
            rejected.append((client, str(err)))
    return good, rejected
