"""What crosses the network in a Flower round, and back: downlinks and client updates as records.

A downlink (server -> client i, fslora_min/methods.py) is, per adapted module, the compact
factors b = B[:, I] (m x k_i) and a = A[I, :] (k_i x n) with the index set I and its diagonal
value(s); an update (client -> server, fslora_min/client.py) is, per module, the deltas
db (m x k_i), da (k_i x n) and the index set it trained. Both travel as one ArrayRecord
(arrays named "<module>/<field>") and one ConfigRecord (scalars), so a message carries
k_i (m + n) numbers of payload plus the index sets and Flower's own framing:
`message_bytes` measures the whole serialized message, `payload_bytes` the factors alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fslora_min.client import ClientUpdate
from fslora_min.lora import CompactFactors
from fslora_min.methods import Downlink
from fslora_min.sketch import Sketch

FACTORS, SETTINGS, DELTAS, COUNTS = "factors", "settings", "deltas", "counts"


def encode_downlink(downlink: Downlink, client_id: int, rank: int) -> RecordDict:
    """Client i's compact factors and index sets, with its id and the global rank r."""
    arrays: dict[str, torch.Tensor] = {}
    settings: dict[str, int | float] = {"client_id": client_id, "rank": rank}
    for name, f in downlink.items():
        arrays[f"{name}/b"], arrays[f"{name}/a"] = f.b.detach().cpu(), f.a.detach().cpu()
        arrays[f"{name}/index"] = f.sketch.index.cpu()
        if f.sketch.per_index is not None:  # one diagonal value per index
            arrays[f"{name}/weight"] = f.sketch.per_index.cpu()
        elif f.sketch.weight is not None:  # one value for every index (None: r / k)
            settings[f"{name}/weight"] = float(f.sketch.weight)
    return RecordDict({FACTORS: ArrayRecord(torch_state_dict=arrays),
                       SETTINGS: ConfigRecord(settings)})


def module_names(arrays: dict[str, torch.Tensor]) -> list[str]:
    """The modules a record's arrays describe, in their order."""
    return list(dict.fromkeys(key.rsplit("/", 1)[0] for key in arrays))


def decode_downlink(content: RecordDict) -> tuple[int, Downlink]:
    """(client id, downlink) from `encode_downlink`'s record."""
    arrays = content[FACTORS].to_torch_state_dict()
    settings = content[SETTINGS]
    downlink = {}
    for name in module_names(arrays):
        weight = arrays.get(f"{name}/weight", settings.get(f"{name}/weight"))
        sketch = Sketch(arrays[f"{name}/index"], int(settings["rank"]), weight)
        downlink[name] = CompactFactors(arrays[f"{name}/b"], arrays[f"{name}/a"], sketch)
    return int(settings["client_id"]), downlink


def encode_update(update: ClientUpdate) -> RecordDict:
    """A client's upload: per module (db, da) and the index set it trained; its counts."""
    arrays: dict[str, torch.Tensor] = {}
    for name, (db, da) in update.deltas.items():
        arrays[f"{name}/db"], arrays[f"{name}/da"] = db.detach().cpu(), da.detach().cpu()
        arrays[f"{name}/index"] = update.sketches[name].index.cpu()
    counts = {"client_id": update.client_id, "num_examples": update.num_examples,
              "trainable_parameters": update.trainable_parameters}
    return RecordDict({DELTAS: ArrayRecord(torch_state_dict=arrays),
                       COUNTS: MetricRecord(counts)})


def decode_update(content: RecordDict, sent: Downlink) -> ClientUpdate:
    """The ClientUpdate in a reply, for the server's screening (fslora_min/validation.py).

    Index sets come from the reply (the screening checks them against `sent`); the diagonal
    values are the ones the server sent. Raises KeyError, TypeError or ValueError (naming the
    problem) on a malformed record: a missing field, a module that was not sent, a bad index.
    """
    arrays = content[DELTAS].to_torch_state_dict()
    counts = content[COUNTS]
    deltas, sketches = {}, {}
    for name in module_names(arrays):
        if name not in sent:
            raise KeyError(f"reply has deltas for module {name!r}, which was not sent")
        deltas[name] = (arrays[f"{name}/db"], arrays[f"{name}/da"])
        sketches[name] = Sketch(arrays[f"{name}/index"], sent[name].sketch.rank,
                                sent[name].sketch.weight)
    return ClientUpdate(int(counts["client_id"]), sketches, deltas, int(counts["num_examples"]),
                        int(counts["trainable_parameters"]))


def message_bytes(message: Message) -> int:
    """Bytes Flower pushes for `message`: every object of its tree (message, records, arrays)
    as serialized, without the transport's own framing (HTTP headers, TLS)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The payload: bytes of the numbers themselves, as the in-process accounting counts them."""
    return sum(t.numel() * t.element_size() for t in tensors)
