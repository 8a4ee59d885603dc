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


# torch's CPU generator state (Generator.get_state(), CPUGeneratorImplStateLegacy): the
# Mersenne Twister's `left` (int32 at byte 8), `next` (uint64 at 16) and its 624 words (as
# uint64 from byte 24); the bytes around them (seed, normal-sample cache) are left as they are.
_LEFT, _NEXT, _WORDS, _N = 8, 16, 24, 624


def randperms(r: int, count: int, generator: torch.Generator) -> np.ndarray:
    """(count, r): exactly `count` calls of torch.randperm(r, generator=generator) (CPU), and
    the generator left where they leave it, without an ATen operation per call.

    torch's CPU randperm (n < 2^32 / 20) is a Fisher-Yates shuffle drawing z = u % (n - i)
    from one 32-bit Mersenne Twister output u per step; numpy's MT19937 is the same engine, so
    the whole batch is one draw of count (r - 1) outputs and r - 1 vectorized swaps.
    tests/test_sketch.py checks it against torch.randperm.
    """
    perms = np.tile(np.arange(r, dtype=np.int64), (count, 1))  # (count, r)
    if r < 2 or count == 0:  # no draw at all
        return perms
    state = generator.get_state().numpy().copy()
    left = int(state[_LEFT:_LEFT + 4].view(np.int32)[0])
    mt = np.random.MT19937()
    mt.state = {"bit_generator": "MT19937",
                "state": {"key": state[_WORDS:_WORDS + 8 * _N].view(np.uint64).astype(np.uint32),
                          "pos": _N if left == 1 else int(state[_NEXT:_NEXT + 8].view(np.uint64)[0])}}
    draws = mt.random_raw((count, r - 1)).astype(np.int64)  # (count, r - 1)
    rows = np.arange(count)
    for i in range(r - 1):
        z = i + draws[:, i] % (r - i)
        perms[rows, i], perms[rows, z] = perms[rows, z], perms[rows, i].copy()
    after = mt.state["state"]
    state[_WORDS:_WORDS + 8 * _N] = after["key"].astype(np.uint64).view(np.uint8)
    state[_LEFT:_LEFT + 4] = np.array([_N + 1 - after["pos"]], np.int32).view(np.uint8)
    state[_NEXT:_NEXT + 8] = np.array([after["pos"]], np.uint64).view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    return perms
