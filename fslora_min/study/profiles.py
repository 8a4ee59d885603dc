"""Client budgets from device profiles: the largest rank k_i a device can afford.

A device is described by the memory it can give to trainable state and the bytes it can upload
per round. Training rank k on modules of shapes (m, n) costs, with numbers of `dtype_bytes`:

    memory(k) = k * sum_modules (m + n) * dtype_bytes * (2 + optimizer slots)
                (the compact factors b, a, their gradients, and SGD's 0 or AdamW's 2 moments)
    upload(k) = k * sum_modules (m + n) * dtype_bytes        (the deltas db, da)

and k_i is the largest k <= r with both within the device's budgets (docs/method.md section 3: a
client's state and traffic scale with k_i, never with r).
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZER_SLOTS = {"sgd": 0, "adamw": 2}  # optimizer state tensors per trainable tensor


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int  # for trainable state: parameters, gradients, optimizer moments
    upload_bytes: int  # per round

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0 or self.upload_bytes <= 0:
            raise ValueError(f"device {self.name!r} needs positive budgets, got memory "
                             f"{self.memory_bytes!r} and upload {self.upload_bytes!r}")


# The compare task's devices (its modules hold 1152 numbers per rank: 4.5 KiB in float32).
# In turn they afford k = 2, 4, 8, 12 of r = 16: the paper's ratios {1/8, 1/4, 1/2, 3/4}.
# The watch and phone are limited by memory, the tablet and laptop by upload.
DEFAULT_PROFILES = (
    DeviceProfile("watch", memory_bytes=20 * 1024, upload_bytes=64 * 1024),
    DeviceProfile("phone", memory_bytes=40 * 1024, upload_bytes=64 * 1024),
    DeviceProfile("tablet", memory_bytes=160 * 1024, upload_bytes=38 * 1024),
    DeviceProfile("laptop", memory_bytes=512 * 1024, upload_bytes=56 * 1024),
)


def numbers_per_rank(shapes: list[tuple[int, int]]) -> int:
    """sum over modules of (m + n): numbers in one rank of b and a together."""
    return sum(m + n for m, n in shapes)


def memory_bytes(k: int, shapes: list[tuple[int, int]], dtype_bytes: int, optimizer: str) -> int:
    """memory(k) = k * sum(m + n) * dtype_bytes * (2 + optimizer slots)."""
    return k * numbers_per_rank(shapes) * dtype_bytes * (2 + OPTIMIZER_SLOTS[optimizer])


def upload_bytes(k: int, shapes: list[tuple[int, int]], dtype_bytes: int) -> int:
    """upload(k) = k * sum(m + n) * dtype_bytes."""
    return k * numbers_per_rank(shapes) * dtype_bytes


def rank_budget(profile: DeviceProfile, shapes: list[tuple[int, int]], r: int,
                dtype_bytes: int = 4, optimizer: str = "sgd") -> int:
    """The largest k <= r whose memory and upload fit the device; an error if not even k = 1."""
    per_mem = memory_bytes(1, shapes, dtype_bytes, optimizer)
    per_up = upload_bytes(1, shapes, dtype_bytes)
    k = min(r, profile.memory_bytes // per_mem, profile.upload_bytes // per_up)
    if k < 1:
        raise ValueError(f"device {profile.name!r} cannot train even rank 1: it needs "
                         f"{per_mem} bytes of memory and {per_up} bytes of upload per round")
    return int(k)


def budgets_from_profiles(profiles: tuple[DeviceProfile, ...], num_clients: int,
                          shapes: list[tuple[int, int]], r: int, dtype_bytes: int = 4,
                          optimizer: str = "sgd") -> list[tuple[DeviceProfile, int]]:
    """(profile, k_i) per client, the profiles taken in turn."""
    return [(p, rank_budget(p, shapes, r, dtype_bytes, optimizer))
            for p in (profiles[i % len(profiles)] for i in range(num_clients))]
