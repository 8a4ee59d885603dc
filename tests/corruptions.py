"""Forged client uploads, one kind of corruption each, and what the server's screening
(fslora_min/validation.py) says of each; shared by test_reliability and test_properties."""

from __future__ import annotations

import copy
import dataclasses

import torch

from fslora_min.client import ClientUpdate
from fslora_min.sketch import Sketch


def with_index(sketch: Sketch, index: torch.Tensor) -> Sketch:
    """A sketch object carrying an arbitrary index, as a forged upload would (no checks)."""
    bad = copy.copy(sketch)
    object.__setattr__(bad, "indices", index)
    return bad


def corrupt(kind: str, u: ClientUpdate, r: int) -> ClientUpdate:
    name = next(iter(u.deltas))
    db, da = (t.clone() for t in u.deltas[name])
    sketches, deltas = dict(u.sketches), dict(u.deltas)
    index = sketches[name].indices
    if kind == "nan":
        db[0, 0] = float("nan")
    elif kind == "inf":
        da[-1, -1] = float("-inf")
    elif kind == "wrong shape":
        db = torch.cat([db, db[:, :1]], 1)
    elif kind == "integer delta":
        da = da.long()
    elif kind == "out of range":
        sketches[name] = with_index(sketches[name], torch.cat([index[:-1], torch.tensor([r])]))
    elif kind == "negative index":
        sketches[name] = with_index(sketches[name], torch.cat([torch.tensor([-1]), index[1:]]))
    elif kind == "duplicated":
        sketches[name] = with_index(sketches[name], index[:1].repeat(len(index)))
    elif kind == "not the sent set":
        other = torch.tensor(sorted(set(range(r)) - set(index.tolist()))[:len(index)])
        sketches[name] = with_index(sketches[name], other)
    elif kind == "missing module":
        del deltas[name]
    elif kind == "other client":
        return dataclasses.replace(u, client_id=u.client_id + 1)
    if kind not in ("missing module",):
        deltas[name] = (db, da)
    return dataclasses.replace(u, sketches=sketches, deltas=deltas)


BAD = {"nan": "1 non-finite entries", "inf": "1 non-finite entries",
       "wrong shape": "shape (16, 3), expected (16, 2)",
       "integer delta": "must be a floating-point tensor, got torch.int64",
       "out of range": "index out of range [0, 4)", "negative index": "index out of range",
       "duplicated": "repeated ranks", "not the sent set": "is not the one sent",
       "missing module": "deltas for modules", "other client": "claims to be from client 2"}
