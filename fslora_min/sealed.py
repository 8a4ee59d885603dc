"""Sealed files: plain data written atomically and read back only when whole and unaltered.

Checkpoints (fslora_min/checkpoint.py) and the cached base models (fslora_min/pretrain.py) are
both written this way, so either, damaged on disk, is caught before it changes a result.

Layout: an 8-byte magic naming the kind of file, the payload's length (8 bytes, big-endian) and
SHA-256 (32 bytes), then the payload, `torch.save` of tensors, numbers, strings, lists and
dicts. Reading checks, in turn, each with an error that names the file and the problem:
  - the file exists and starts with the magic (else: not a file of this kind);
  - it holds the announced number of bytes (else: truncated, e.g. by a crash mid-copy);
  - the SHA-256 matches (else: corrupted or tampered with);
  - `torch.load(..., weights_only=True)` accepts it: plain data, never pickled code, so even a
    payload with a forged digest cannot run anything.
Writing goes to a temporary file (named by the process, so processes writing at once never
clash) that is flushed to disk and then renamed over the old file: a crash at any point leaves
the previous file, never a half-written one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path

import torch

MAGIC_BYTES = 8
HEADER = MAGIC_BYTES + 8 + 32  # magic, payload length, SHA-256


def load_failure(err: Exception) -> str:
    """Why `torch.load(..., weights_only=True)` refused a payload, in one line.

    PyTorch's own message for a file that holds more than tensors suggests retrying with
    weights_only=False, which would run whatever code the file carries: never repeat that.
    """
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
        return ("not plain tensors and numbers" + (f" ({detail.group(1)})" if detail else ""))
    return text.splitlines()[0] if text else type(err).__name__


def write_sealed(path: Path, obj: object, magic: bytes) -> None:
    """Write `obj` to `path` atomically, behind `magic` and its payload's length and SHA-256."""
    assert len(magic) == MAGIC_BYTES, magic
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(magic + len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest())
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the latest
    os.replace(tmp, path)


def read_sealed(path: Path, magic: bytes, what: str,
                error: type[ValueError] = ValueError) -> object:
    """The checked, safely unpickled payload of the sealed file at `path`; `error` (naming the
    file, `what` it should be, and the problem) when it is missing, damaged or unsafe."""
    if not path.is_file():
        raise error(f"no {what} at {path}")
    raw = path.read_bytes()
    if raw[:MAGIC_BYTES] != magic:
        raise error(f"{path} is not an fslora-min {what} (bad header)")
    if len(raw) < HEADER:
        raise error(f"{path} is truncated: {len(raw)} bytes, shorter than the header")
    length = int.from_bytes(raw[MAGIC_BYTES:MAGIC_BYTES + 8], "big")
    payload = raw[HEADER:]
    if len(payload) != length:
        raise error(f"{path} is truncated or padded: the header announces {length} bytes of "
                    f"payload, the file holds {len(payload)}")
    if hashlib.sha256(payload).digest() != raw[HEADER - 32:HEADER]:
        raise error(f"{path} is corrupted or tampered with: SHA-256 mismatch")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise error(f"{path} holds something other than plain tensors and numbers; refused to "
                    f"unpickle it (weights_only): {load_failure(err)}") from None
