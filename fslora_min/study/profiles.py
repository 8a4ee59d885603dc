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

import torch

from fslora_min.experiment import ExperimentConfig
from fslora_min.lora import adapted_layers
from fslora_min.model import Transformer

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


def module_shapes(exp: ExperimentConfig) -> list[tuple[int, int]]:
    """(m, n) of every LoRA module of the task's model, as model.py builds its projections."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        layers = adapted_layers(Transformer(exp.model), exp.lora.targets)
    return [(layer.out_features, layer.in_features) for layer in layers.values()]


def flops_per_local_step(exp: ExperimentConfig, k: int) -> float:
    """~ tokens * (4 P_lin + 6 k sum(m + n)) + attention: one minibatch forward and backward.

    The frozen linear weights (P_lin numbers, LM head included) cost 2 FLOPs per weight per token
    forward and 2 backward (activation gradients only); the LoRA factors 2 forward and 4 backward
    (both gradients); causal attention ~ 2 * 2 * t * d per token per layer forward, x3 with the
    backward.
    """
    mc, tokens = exp.model, exp.client.batch_size * exp.data.seq_len
    p_lin = sum(m * n for m, n in module_shapes(exp)) + mc.d_model * mc.vocab_size
    lora = k * sum(m + n for m, n in module_shapes(exp))
    attention = 3 * 4 * exp.data.seq_len * mc.d_model * mc.n_layer
    return tokens * (4 * p_lin + 6 * lora + attention)


def budget_table(exp: ExperimentConfig) -> tuple[str, list[int]]:
    """Each client's device budgets, its k_i, and the memory (with the clients' own optimizer's
    state) and upload that k_i uses."""
    shapes = module_shapes(exp)
    assigned = budgets_from_profiles(DEFAULT_PROFILES, exp.federation.num_clients, shapes,
                                     exp.lora.rank, optimizer=exp.client.optimizer)
    lines = ["| client | device | memory budget (KiB) | upload budget (KiB/round) | k_i | "
             "memory used (KiB) | upload used (KiB/round) |", "|" + "---|" * 7]
    for i, (p, k) in enumerate(assigned):
        lines.append(f"| {i} | {p.name} | {p.memory_bytes / 1024:.1f} | "
                     f"{p.upload_bytes / 1024:.1f} | {k} | "
                     f"{memory_bytes(k, shapes, 4, exp.client.optimizer) / 1024:.1f} | "
                     f"{upload_bytes(k, shapes, 4) / 1024:.1f} |")
    return "\n".join(lines) + "\n", [k for _, k in assigned]
