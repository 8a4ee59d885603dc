"""Checkpoints: the whole state of a federation, written atomically, read back safely.

A checkpoint is a sealed file (fslora_min/sealed.py: magic, length, SHA-256, plain-data payload,
atomic writes) whose payload is {version, config, federation}. Reading checks, beyond the seal,
that the format version and the top-level keys are the expected ones and that the run
configuration it was written for equals this run's (naming every difference).
"""

from __future__ import annotations

from pathlib import Path

from fslora_min.sealed import read_sealed, write_sealed

MAGIC = b"FSLORAck"
VERSION = 1
KEYS = ("version", "config", "federation")  # the payload's top level
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: Path, config: dict, federation: dict) -> None:
    """Write {version, config, federation} to `path` atomically (temporary file, then rename)."""
    write_sealed(Path(path), {"version": VERSION, "config": config, "federation": federation},
                 MAGIC)


def read_payload(path: Path) -> dict:
    """The checked, safely unpickled payload of the checkpoint at `path`."""
    state = read_sealed(Path(path), MAGIC, "checkpoint", CheckpointError)
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
