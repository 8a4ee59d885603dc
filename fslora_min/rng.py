"""Named random streams: one torch.Generator per (seed, purpose, ...), so runs replay exactly.

Each stream (client sampling, sketches, one client's minibatches, LoRA init, ...) has its own
generator, so drawing more from one never shifts another: two methods compared on one seed
see the same participants and the same minibatches.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream ids: fixed numbers, so adding a stream never changes an existing one.
DATA_TOPICS, DATA_CLIENT, DATA_HELDOUT, PRETRAIN = 0, 1, 2, 3
PARTICIPANTS, SKETCHES, MINIBATCHES, LORA_INIT, CLIENT_RANKS, DIRICHLET = 4, 5, 6, 8, 11, 7
DROPOUT = 12  # which participants fail mid-round
PLANTED = 13  # the planted-rank task (fslora_min/planted.py): its output directions, its samples
MASKS = 14  # the model's dropout masks: one stream per (round, client)
ROLES = 19  # which (play, role) pairs are the Shakespeare task's clients


def stream_seed(seed: int, *stream: int) -> int:
    """A 64-bit seed for the stream `stream` of `seed` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """An independent torch generator for one stream of one seed (on the CPU unless `device`
    says otherwise: a CUDA tensor draws only from a CUDA generator)."""
    return torch.Generator(device).manual_seed(stream_seed(seed, *stream))


def numpy_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(stream_seed(seed, *stream))
