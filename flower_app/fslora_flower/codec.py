"""What crosses the network in a Flower round, and back: downlinks and client updates as records.

A downlink (server -> client i, fslora_min/client.py `Downlink`) is, per adapted module, the
compact factors b = B[:, I] (m x k_i) and a = A[I, :] (k_i x n) with the index set I and its
diagonal value(s); an update (client -> server, fslora_min/client.py) is, per module, the deltas
db (m x k_i), da (k_i x n) and the index set it trained.

Each travels packed: the modules' factors (or deltas) flattened into one array, their index
sets into another (and per-index weights, if any, into a third), with the module names and
shapes in a ConfigRecord. Flower frames every array it sends (a header, an object id, a name:
about 460 bytes each), so one array per module field would add ~33 KiB per message for the
default model's 24 modules x 3 fields; packed, a message is its payload, k_i (m + n) numbers per
module, plus one small fixed cost. `message_bytes` measures a whole serialized message,
`payload_bytes` the packed factors (or deltas) array in it alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import prod

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fslora_min.client import ClientUpdate
from fslora_min.lora import CompactFactors
from fslora_min.client import Downlink
from fslora_min.sketch import Sketch

ARRAYS, SETTINGS, COUNTS = "arrays", "settings", "counts"


def pack(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One flat CPU tensor holding `tensors` one after another."""
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


def unpack(flat: torch.Tensor, shapes: list[tuple[int, ...]], what: str) -> list[torch.Tensor]:
    """`pack`'s inverse; a ValueError naming `what` when the sizes do not add up."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"{what}: {tuple(flat.shape)} numbers, expected {sum(sizes)}")
    return [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)]


def encode_downlink(downlink: Downlink, client_id: int, rank: int) -> RecordDict:
    """Client i's compact factors and index sets, with its id and the global rank r."""
    fs = list(downlink.values())
    per_index = [f.sketch.per_index is not None for f in fs]
    arrays = {"factors": pack(t for f in fs for t in (f.b, f.a)),
              "indices": pack(f.sketch.indices for f in fs)}
    if any(per_index):  # one diagonal value per index (the importance sketch)
        arrays["weights"] = pack(f.sketch.per_index for f in fs if f.sketch.per_index is not None)
    settings = {"client_id": client_id, "rank": rank, "modules": list(downlink),
                "m": [f.b.shape[0] for f in fs], "k": [f.sketch.k for f in fs],
                "n": [f.a.shape[1] for f in fs], "per_index": per_index,
                # one value for every index (r / k unless the method says otherwise)
                "sketch_weight": [0.0 if p else float(f.sketch.sketch_weight)
                                  for f, p in zip(fs, per_index)]}
    return RecordDict({ARRAYS: ArrayRecord(torch_state_dict=arrays),
                       SETTINGS: ConfigRecord(settings)})


def decode_downlink(content: RecordDict) -> tuple[int, Downlink]:
    """(client id, downlink) from `encode_downlink`'s record."""
    arrays, s = content[ARRAYS].to_torch_state_dict(), content[SETTINGS]
    ms, ks, ns = list(s["m"]), list(s["k"]), list(s["n"])
    factors = iter(unpack(arrays["factors"], [shape for m, k, n in zip(ms, ks, ns)
                                              for shape in ((m, k), (k, n))], "factors"))
    indices = unpack(arrays["indices"], [(k,) for k in ks], "index sets")
    weights = iter(unpack(arrays["weights"], [(k,) for k, p in zip(ks, s["per_index"]) if p],
                          "weights") if "weights" in arrays else [])
    downlink = {}
    for name, index, per, weight in zip(s["modules"], indices, s["per_index"],
                                        s["sketch_weight"]):
        sketch = Sketch(index, int(s["rank"]), next(weights) if per else weight)
        downlink[name] = CompactFactors(next(factors), next(factors), sketch)
    return int(s["client_id"]), downlink


def encode_update(update: ClientUpdate) -> RecordDict:
    """A client's upload: per module (db, da) and the index set it trained; its counts."""
    names = list(update.deltas)
    arrays = {"deltas": pack(d for name in names for d in update.deltas[name]),
              "indices": pack(update.sketches[name].indices for name in names)}
    counts = {"client_id": update.client_id, "num_examples": update.num_examples,
              "trainable_parameters": update.trainable_parameters}
    return RecordDict({ARRAYS: ArrayRecord(torch_state_dict=arrays),
                       SETTINGS: ConfigRecord({"modules": names}),
                       COUNTS: MetricRecord(counts)})


def decode_update(content: RecordDict, sent: Downlink) -> ClientUpdate:
    """The ClientUpdate in a reply, for the server's screening (fslora_min/validation.py).

    The deltas are unpacked in the shapes that were sent, the index sets as the reply gives
    them (the screening compares them with what was sent); the diagonal values are the ones
    the server sent. Raises KeyError or ValueError, naming the problem, on a malformed record.
    """
    arrays, names = content[ARRAYS].to_torch_state_dict(), list(content[SETTINGS]["modules"])
    unknown = [name for name in names if name not in sent]
    if unknown:
        raise KeyError(f"reply has deltas for modules {unknown}, which were not sent")
    fs = [sent[name] for name in names]
    deltas = iter(unpack(arrays["deltas"], [shape for f in fs for shape in
                                            (tuple(f.b.shape), tuple(f.a.shape))], "deltas"))
    indices = unpack(arrays["indices"], [(f.sketch.k,) for f in fs], "index sets")
    counts = content[COUNTS]
    return ClientUpdate(int(counts["client_id"]),
                        {name: Sketch(index, f.sketch.rank, f.sketch.weight)
                         for name, f, index in zip(names, fs, indices)},
                        {name: (next(deltas), next(deltas)) for name in names},
                        int(counts["num_examples"]), int(counts["trainable_parameters"]))


def message_bytes(message: Message) -> int:
    """Bytes Flower pushes for `message`: every object of its tree (message, records, arrays)
    as serialized, without the transport's own framing (HTTP headers, TLS)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(message: Message) -> int:
    """The payload as encoded in `message`: the bytes of the numbers in its packed factors
    (downlink) or deltas (update) array, its shape times its dtype's width."""
    arrays = message.content[ARRAYS]
    array = arrays["factors"] if "factors" in arrays else arrays["deltas"]
    return prod(array.shape) * np.dtype(array.dtype).itemsize
