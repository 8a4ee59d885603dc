"""The client side of one FSLoRA round (FSLORA.md section 3, steps 3 and 4).

Client i receives, per adapted module, its compact factors b = B[:, I] (m x k_i) and
a = A[I, :] (k_i x n) with the index set I. It trains only them, for H local steps, in the
forward W0 + s (r/k_i) b a, and uploads the deltas (b_H - b_0, a_H - a_0). Its trainable
parameters and optimizer state are the compact factors: they scale with k_i, never with r.
Training b, a directly is exact for any optimizer, where "train B S with gradients scaled by
S^2" is exact only for plain SGD (FSLORA.md section 3, last paragraph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from fslora_min.lora import CompactFactors, compact_factors
from fslora_min.model import dropout_masks
from fslora_min.sketch import Sketch

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class ClientConfig:
    local_steps: int = 10  # H
    lr: float = 0.2  # eta_l
    optimizer: str = "sgd"  # "sgd" (the paper's analysis) or "adamw"; state is fresh each round
    weight_decay: float = 0.0  # AdamW only
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ValueError(f"local steps H must be a positive integer, got {self.local_steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"local learning rate must be positive and finite, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"client optimizer must be one of {OPTIMIZERS}, "
                             f"got {self.optimizer!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be >= 0 and finite, got {self.weight_decay!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")


@dataclass
class ClientUpdate:
    """What a client uploads: per module, its index set and the deltas of its compact factors."""

    client_id: int
    sketches: dict[str, Sketch]
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (db (m, k), da (k, n))
    num_examples: int  # the client's training-set size, for data-weighted baselines
    trainable_parameters: int  # numbers the client's optimizer updated: sum k_i (m + n)


def make_optimizer(params: list[torch.Tensor], cfg: ClientConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, batch) -> scalar loss


def train_client(model: nn.Module, client_id: int, downlink: dict[str, CompactFactors],
                 batches: Iterator[torch.Tensor], loss_fn: LossFn, cfg: ClientConfig,
                 num_examples: int, masks: torch.Generator | None = None) -> ClientUpdate:
    """H local steps on the compact factors, in train mode; returns their deltas.

    `downlink` holds the server's copies of b_0, a_0; the client trains clones of them, so the
    server's tensors are never written here. `masks` draws the model's dropout masks (the
    federation passes this round's and client's stream, fslora_min/rng.py; None: torch's
    global generator).
    """
    device = next(model.parameters()).device
    local = {name: CompactFactors(f.b.detach().clone().to(device).requires_grad_(True),
                                  f.a.detach().clone().to(device).requires_grad_(True), f.sketch)
             for name, f in downlink.items()}
    params = [t for f in local.values() for t in (f.b, f.a)]  # sum_modules k_i (m + n) numbers
    opt = make_optimizer(params, cfg)
    with compact_factors(model, local), dropout_masks(model, None if masks is None else [masks]):
        for _ in range(cfg.local_steps):
            loss = loss_fn(model, next(batches).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    deltas = {name: (f.b.detach() - downlink[name].b.to(device),
                     f.a.detach() - downlink[name].a.to(device))
              for name, f in local.items()}
    return ClientUpdate(client_id, {n: f.sketch for n, f in downlink.items()}, deltas,
                        num_examples, sum(p.numel() for p in params))
