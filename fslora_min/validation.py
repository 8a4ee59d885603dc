"""The server's checks on a client update, before it touches the global model.

A client is untrusted: its upload may be wrong-shaped, carry NaN or Inf, name ranks it was not
sent, or repeat a rank (which would count one delta twice in the padded average). The server
knows what it sent each participant (the downlink: per module the index set I and the compact
factors b (m x k), a (k x n)), so it checks the upload against that:
  - the same modules, and the update is from the client it was sent to;
  - per module, an index set of k distinct int64 ranks in [0, r), equal to the one sent;
  - db of shape (m, k) and da of shape (k, n), floating point, every entry finite.
An update that fails any check is rejected whole, with the reason; the round goes on with
the others (fslora_min/federation.py).
"""

from __future__ import annotations

import torch

from fslora_min.client import ClientUpdate
from fslora_min.lora import CompactFactors


class BadUpdate(ValueError):
    """A client update the server refuses; the message says why."""


def check_index(index: object, sent: torch.Tensor, r: int, where: str) -> None:
    """The index set must be k distinct int64 ranks in [0, r), the very set that was sent."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
        kind = (f"{index.dtype} tensor of shape {tuple(index.shape)}"
                if isinstance(index, torch.Tensor) else type(index).__name__)
        raise BadUpdate(f"{where}: index set must be a 1-D int64 tensor, got {kind}")
    if index.numel() != sent.numel():
        raise BadUpdate(f"{where}: index set has {index.numel()} ranks, {sent.numel()} were sent")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= r):
        raise BadUpdate(f"{where}: index out of range [0, {r}): {index.tolist()}")
    if torch.unique(index).numel() != index.numel():
        raise BadUpdate(f"{where}: repeated ranks in the index set {index.tolist()}")
    if not torch.equal(index.cpu(), sent.cpu()):
        raise BadUpdate(f"{where}: index set {index.tolist()} is not the one sent, "
                        f"{sent.tolist()}")


def check_delta(delta: object, shape: tuple[int, int], where: str) -> None:
    """A floating-point tensor of the downlink's shape with every entry finite."""
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
        kind = delta.dtype if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise BadUpdate(f"{where}: must be a floating-point tensor, got {kind}")
    if tuple(delta.shape) != shape:
        raise BadUpdate(f"{where}: shape {tuple(delta.shape)}, expected {shape}")
    bad = int((~torch.isfinite(delta)).sum())
    if bad:
        raise BadUpdate(f"{where}: {bad} non-finite entries (NaN or Inf)")


def check_update(update: ClientUpdate, client_id: int, sent: dict[str, CompactFactors],
                 r: int) -> None:
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
        check_delta(pair[0], tuple(factors.b.shape), f"{where}, db")
        check_delta(pair[1], tuple(factors.a.shape), f"{where}, da")


def screen_updates(updates: list[ClientUpdate], clients: list[int],
                   downlinks: list[dict[str, CompactFactors]], r: int,
                   ) -> tuple[list[int], list[tuple[int, str]]]:
    """Positions of the updates that pass `check_update`, and (client, reason) for the rest."""
    good, rejected = [], []
    for pos, (update, client, sent) in enumerate(zip(updates, clients, downlinks)):
        try:
            check_update(update, client, sent, r)
            good.append(pos)
        except BadUpdate as err:
            rejected.append((client, str(err)))
    return good, rejected
