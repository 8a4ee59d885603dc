"""Count the ATen operations and host syncs a piece of code dispatches (a round's host cost).

On a GPU each non-view operation is roughly one kernel launch (12-20 us of host time), and a
host sync stalls the CPU until the device catches up, so these two counts, unlike a CPU
timing, say what a round costs on a GPU from a run on any device. View operations (slicing,
reshape of contiguous tensors) launch nothing and are not counted. A host sync is an operation
whose result the host must read: `item()`/`int()` (`_local_scalar_dense`), `torch.equal`,
shape-dependent results (`nonzero`, `unique`, `masked_select`) and copies to the CPU from
another device. On a CPU run the copies are absent; the other kinds are counted on any device.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "equal", "nonzero", "_unique2", "unique_dim",
            "unique_consecutive", "masked_select", "is_nonzero"}


def is_sync(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """Does this operation make the host wait for the device's result?"""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst_device = (args[0].device if name == "copy_"
                      else kwargs.get("device") or src.device)
        return src.device.type != "cpu" and torch.device(dst_device).type == "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...`; then c.ops (non-view operations), c.syncs, c.by_name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.syncs, self.by_name = 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            self.ops += 1
            self.by_name[func.overloadpacket.__name__] += 1
            self.syncs += is_sync(func, args, kwargs)
        return func(*args, **kwargs)
