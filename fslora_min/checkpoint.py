"""Checkpoints: the whole state of a federation, written atomically, read back safely.

File layout: an 8-byte magic, the payload's length (8 bytes, big-endian) and SHA-256 (32 bytes),
then the payload, `torch.save` of a dict of tensors, numbers, strings, lists and dicts only.
Reading checks, in turn, each with an error that names the problem:
  - the file exists and starts with the magic (else: not a checkpoint of this project);
  - it holds the announced number of bytes (else: truncated, e.g. by a crash mid-copy);
  - the SHA-256 matches (else: corrupted or tampered with);
  - `torch.load(..., weights_only=True)` accepts it: plain data, never pickled code, so even a
    payload with a forged digest cannot run anything;
  - the format version and the top-level keys are the expected ones;
  - the run configuration it was written for equals this run's (names every difference).
Writing goes to a temporary file that is flushed to disk and then renamed over the old
checkpoint: a crash at any point leaves the previous checkpoint, never a half-written one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import torch

from fslora_min.pretrain import load_failure

MAGIC = b"FSLORAck"
VERSION = 1
HEADER = len(MAGIC) + 8 + 32  # magic, payload length, SHA-256
KEYS = ("version", "config", "federation")  # the payload's top level
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: Path, config: dict, federation: dict) -> None:
    """Write {version, config, federation} to `path` atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    torch.save({"version": VERSION, "config": config, "federation": federation}, buffer)
    payload = buffer.getvalue()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest())
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the latest
    os.replace(tmp, path)


def read_payload(path: Path) -> dict:
    """The checked, safely unpickled payload of the checkpoint at `path`."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    raw = path.read_bytes()
    if raw[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not an fslora-min checkpoint (bad header)")
    if len(raw) < HEADER:
        raise CheckpointError(f"{path} is truncated: {len(raw)} bytes, shorter than the header")
    length = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 8], "big")
    payload = raw[HEADER:]
    if len(payload) != length:
        raise CheckpointError(f"{path} is truncated or padded: the header announces {length} "
                              f"bytes of payload, the file holds {len(payload)}")
    if hashlib.sha256(payload).digest() != raw[HEADER - 32:HEADER]:
        raise CheckpointError(f"{path} is corrupted or tampered with: SHA-256 mismatch")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path} holds something other than plain tensors and numbers; "
                              f"refused to unpickle it (weights_only): {load_failure(err)}"
                              ) from None
    if not isinstance(state, dict) or tuple(sorted(state)) != tuple(sorted(KEYS)):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} has top-level keys {keys}, expected {sorted(KEYS)}")
    if state["version"] != VERSION:
        raise CheckpointError(f"{path} has format version {state['version']!r}, this code "
                              f"reads version {VERSION}")
    return state


def config_differences(saved: object, current: object, prefix: str = "") -> list[str]:
    """'key: checkpoint X, this run Y' for every leaf where two nested configs differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(set(saved) | set(current), key=str)
                for line in config_differences(saved.get(key, "<absent>"),
                                               current.get(key, "<absent>"),
                                               f"{prefix}{key}.")]
    return [] if saved == current else [f"{prefix[:-1]}: checkpoint {saved!r}, this run "
                                        f"{current!r}"]


def load_checkpoint(path: Path, config: dict) -> dict:
    """The federation state saved at `path`, after checking it was written for `config`."""
    state = read_payload(Path(path))
    differences = config_differences(state["config"], config)
    if differences:
        raise CheckpointError(f"{path} was written by a run with another configuration: "
                              + "; ".join(differences))
    return state["federation"]
