"""A linear federated task on which theory/sketch_bias.py's closed forms are exact.

One LoRA layer W = W0 + s B A (m x n, W0 = 0), squared loss against a planted low-rank target
W* = U diag(sigma) V^T (flat spectrum by default), whitened inputs: client i's data is
Z (d x n) with Z^T Z / d = I exactly, so its loss is exactly
F_i(W) = 1/(2d) ||Z (W - W*_i)^T||^2 = 1/2 ||W - W*_i||_F^2 (clients identical by default;
`heterogeneity` > 0 gives each its own perturbed target, where the closed forms no longer
hold). Every local step is full-batch: the only noise left is the method's own (the sketch).

The Federation loop (fslora_min/federation.py) trains clients with the language-model loss
(model.lm_loss) and scores them with next-token cross-entropy (federation.evaluate), so it
cannot run a squared loss. This module is the smallest adapter: it plays the same round with
the same pieces, in the same order as Federation.plan_round / run_round / aggregate (the
Server, the method's `sketches`, `downlink`, `client_upload` and `aggregate`, the clients
training their compact factors under lora.compact_factors), with the squared loss in place of
lm_loss and the exact excess loss in place of evaluate. It trains one client at a time (the
sequential engine's reference path); the batched engine is LM-only and is not used here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from fslora_min.client import client_update, local_factors, trainable
from fslora_min.lora import CompactFactors, LoRALinear, compact_factors
from fslora_min.registry import make_method
from fslora_min.server import Server, ServerConfig

SPECTRA = ("flat", "geometric")


@dataclass(frozen=True)
class LinearConfig:
    """The problem, the federation and the method (every client full-batch, all participate)."""

    method: str = "fslora"
    m: int = 24
    n: int = 24
    target_rank: int = 16  # R*, the planted target's rank
    spectrum: str = "flat"  # flat: sigma_l = 1; geometric: sigma_l = 2^-l (l = 0..R*-1)
    heterogeneity: float = 0.0  # client i's target: W* + heterogeneity * its own Gaussian
    rank: int = 16  # r, the server's LoRA rank
    client_ranks: tuple[int, ...] = (2, 4, 8, 12)  # the paper's ratios of r
    alpha: float = 16.0  # s = alpha / r = 1
    lr: float = 0.05
    local_steps: int = 2
    rounds: int = 600
    samples: int = 64  # d, rows of each client's whitened design
    seed: int = 0

    def __post_init__(self) -> None:
        if self.spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {self.spectrum!r}")
        if not 1 <= self.target_rank <= min(self.m, self.n) or self.samples < self.n:
            raise ValueError("need 1 <= target_rank <= min(m, n) and samples >= n")


def spectrum(cfg: LinearConfig) -> np.ndarray:
    """sigma_l of the planted target, largest first."""
    ell = np.arange(cfg.target_rank)
    return np.ones(cfg.target_rank) if cfg.spectrum == "flat" else 2.0 ** -ell


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def planted_target(cfg: LinearConfig, g: torch.Generator) -> torch.Tensor:
    """W* = U diag(sigma) V^T with U, V drawn orthonormal (m x R*, n x R*)."""
    u, v = orthonormal(cfg.m, cfg.target_rank, g), orthonormal(cfg.n, cfg.target_rank, g)
    return u @ torch.diag(torch.from_numpy(spectrum(cfg))) @ v.T


def whitened_design(cfg: LinearConfig, g: torch.Generator) -> torch.Tensor:
    """Z (d x n) with Z^T Z / d = I: E_z over the client's data of z z^T is exactly I."""
    return orthonormal(cfg.samples, cfg.n, g) * math.sqrt(cfg.samples)


class LinearModel(nn.Module):
    """The one adapted layer (W0 = 0), float64 so that fixed points are not lost to rounding."""

    def __init__(self, cfg: LinearConfig, rank: int, g: torch.Generator) -> None:
        super().__init__()
        base = nn.Linear(cfg.n, cfg.m, bias=False, dtype=torch.float64)
        nn.init.zeros_(base.weight)
        self.proj = LoRALinear(base, rank, cfg.alpha, generator=g)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


def squared_loss(model: nn.Module, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1/(2d) ||model(Z) - Y||^2 = 1/2 ||W - W*_i||_F^2 on whitened inputs (Y = Z W*_i^T)."""
    return 0.5 * ((model(z) - y) ** 2).sum() / len(z)


def global_weight(model: LinearModel) -> torch.Tensor:
    """W = W0 + s B A, the server's layer (W0 as initialised, or with FLoRA's merges)."""
    with torch.no_grad():
        return model.proj.weight + model.proj.delta_weight()


def excess_fraction(model: LinearModel, target: torch.Tensor) -> float:
    """||W - W*||_F^2 / ||W*||_F^2: the fraction of the target (W0 = 0) left, which is
    sketch_bias's excess_loss divided by its value at M = 0."""
    return float(((global_weight(model) - target) ** 2).sum() / (target ** 2).sum())


def train_linear_client(model: nn.Module, client_id: int, downlink: dict[str, CompactFactors],
                        z: torch.Tensor, y: torch.Tensor, cfg: LinearConfig):
    """client.train_client with the squared loss: H full-batch SGD steps on clones of the
    compact factors (a fold stays frozen), the deltas uploaded."""
    local = local_factors(downlink, z.device)
    opt = torch.optim.SGD(trainable(local), lr=cfg.lr)
    with compact_factors(model, local):
        for _ in range(cfg.local_steps):
            opt.zero_grad(set_to_none=True)
            squared_loss(model, z, y).backward()
            opt.step()
    return client_update(client_id, downlink, {n: (f.b, f.a) for n, f in local.items()}, len(z))


def update_spectrum(model: LinearModel) -> list[float]:
    """Singular values of the global update W - W0 = s B A (W0 as initialised; FLoRA's merges
    into W0 included), largest first: where its energy sits, rank by rank."""
    return torch.linalg.svdvals(global_weight(model)).tolist()


def run_linear(cfg: LinearConfig, record_every: int = 0) -> dict:
    """Play cfg.rounds rounds; the fraction of the target left after every round, and with
    `record_every` > 0 the update's singular values at round 0 and every that many rounds."""
    g = torch.Generator().manual_seed(cfg.seed)
    target = planted_target(cfg, g)
    z = [whitened_design(cfg, g) for _ in cfg.client_ranks]
    targets = [target + cfg.heterogeneity * torch.randn(target.shape, generator=g,
                                                        dtype=torch.float64)
               for _ in cfg.client_ranks]
    method = make_method(cfg.method, cfg.rank, torch.Generator().manual_seed(cfg.seed + 1))
    global_rank = method.global_rank(cfg.rank, list(cfg.client_ranks), min(cfg.m, cfg.n))
    trained = method.trained_ranks(list(cfg.client_ranks), cfg.rank)
    model = LinearModel(cfg, global_rank, torch.Generator().manual_seed(cfg.seed + 2))
    server = Server(model, ServerConfig())
    sketch_stream = torch.Generator().manual_seed(cfg.seed + 3)
    curve, spectra = [excess_fraction(model, target)], {}
    for t in range(cfg.rounds + 1):
        if record_every and t % record_every == 0:
            spectra[t] = update_spectrum(model)
        if t == cfg.rounds:
            break
        downlinks = [method.downlink(server, method.sketches(server, k, sketch_stream))
                     for k in trained]
        updates = [method.client_upload(
            train_linear_client(model, i, down, zi, zi @ ti.T, cfg), down)
            for i, (down, zi, ti) in enumerate(zip(downlinks, z, targets))]
        method.aggregate(server, updates, downlinks)
        curve.append(excess_fraction(model, target))
    return {"method": cfg.method, "global_rank": global_rank, "trained_ranks": trained,
            "curve": curve} | ({"spectra": spectra} if record_every else {})


def settled(curve: list[float], window: float = 0.1, tolerance: float = 0.002) -> bool:
    """At its fixed point: the mean fraction left over the last `window` of the rounds moved by
    at most `tolerance` (absolute) from the window before it. (protocol.plateau's relative test
    never passes for a method whose excess decays geometrically to 0.)"""
    w = max(1, int(len(curve) * window))
    return (len(curve) > 2 * w
            and abs(np.mean(curve[-2 * w:-w]) - np.mean(curve[-w:])) <= tolerance)


def measured_fraction(curve: list[float], window: float = 0.1) -> float:
    """The mean fraction left over the last `window` of the rounds (FSLoRA's iterate keeps
    moving with its sketches: its fixed point is a mean, not a point)."""
    return float(np.mean(curve[-max(1, int(len(curve) * window)):]))


