"""A task where adapter rank binds: text sampled from a teacher = the base model plus a planted
rank-R* update of ONE layer.

The synthetic task's shift is limited by optimisation more than by rank (a rank-16 change
planted in all 12 modules gave FedAvg ranks 2 / 4 / 16 nearly the same loss), so it cannot show
FSLoRA's point: all r ranks get trained. Here the teacher's layer W becomes

    W* = W + sum_{j < R*} (g / sigma_j) u_j v_j^T,

with v_j the top-R* principal directions of that layer's inputs on base-model text (sigma_j^2
their second moments), u_j random orthonormal output directions, and g = strength * RMS ||W x||
/ sqrt(R*): every direction moves the layer's output by the same amount, so none can be dropped
cheaply and a student of rank < R* must leave some of the change unlearnt.

Clients keep the synthetic task's non-IID split: each sequence starts with `prefix` tokens of
the client's own topic mixture (fslora_min/data.py) and the teacher continues it by sampling.
Only the teacher's tokens are scored (`FederatedData.scored_from` = prefix - 1, in training and
in every held-out score): the prefix is context; scoring its targets would measure how well a
run learns the shifted Markov topics, not the planted change. `planted_kl` measures what the
change is worth, KL(teacher || base) on the scored targets; `strength` sets it.
The task's config is `PlantedDataConfig` (fslora_min/planted.py): the synthetic task's knobs and
the planted update's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fslora_min.data import (ClientData, DataConfig, FederatedData, pretraining_batches,
                             split_inputs_targets)
from fslora_min.rng import PLANTED, generator


@dataclass
class PlantedConfig:
    layer: str = "blocks.1.mlp.proj"  # the one adapted layer the teacher changes
    rank: int = 16  # R*
    strength: float = 4.0  # RMS of the planted change of the layer's output / RMS of its output
    prefix: int = 4  # tokens of each sequence from the client's topic mixture
    probe_seqs: int = 256  # base-model sequences whose layer inputs give the directions
    # Training sequences per client the teacher writes. With 32 (the synthetic task's), 300
    # rounds of H = 5 steps x batch 8 are ~190 epochs and the held-out loss turns up within
    # tens of rounds, before the planted change is learnt; with 1024 it still falls at 300.
    train_seqs: int = 1024

    def __post_init__(self) -> None:
        for name in ("rank", "prefix", "probe_seqs", "train_seqs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"planted {name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if not self.strength > 0:
            raise ValueError(f"planted strength must be positive, got {self.strength!r}")


@dataclass
class PlantedDataConfig(DataConfig):
    """The planted task: the synthetic task's clients (DataConfig), every sequence continued by
    the teacher that `planted` describes. Its base model is the synthetic task's."""

    planted: PlantedConfig = field(default_factory=PlantedConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.planted.train_seqs != self.train_seqs:
            raise ValueError(f"planted train_seqs={self.planted.train_seqs} differs from the "
                             f"data's train_seqs={self.train_seqs}")
        if self.planted.prefix >= self.seq_len:
            raise ValueError(f"planted prefix {self.planted.prefix} leaves no teacher tokens in "
                             f"sequences of {self.seq_len + 1}")


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Linear, seqs: torch.Tensor) -> torch.Tensor:
    """(tokens, n): the inputs `layer` sees when `model` reads `seqs`."""
    seen = []
    hook = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].flatten(0, -2)))
    try:
        model(split_inputs_targets(seqs)[0])
    finally:
        hook.remove()
    return torch.cat(seen).double()


def planted_delta(weight: torch.Tensor, inputs: torch.Tensor, cfg: PlantedConfig,
                  gen: torch.Generator, keep: list[int] | None = None) -> torch.Tensor:
    """Delta = sum_j (g / sigma_j) u_j v_j^T (m x n), the module docstring's equation; with
    `keep`, only those terms j (the rest of the change left out, to measure what each is worth).
    """
    m, n = weight.shape
    if cfg.rank > min(m, n):
        raise ValueError(f"planted rank {cfg.rank} exceeds min(m, n) = {min(m, n)} of "
                         f"{cfg.layer}")
    second = inputs.T @ inputs / len(inputs)  # (n, n) second moments of the inputs
    eigval, eigvec = torch.linalg.eigh(second)  # ascending
    v = eigvec[:, -cfg.rank:].flip(1)  # (n, R*) top principal directions
    sigma = eigval[-cfg.rank:].flip(0).clamp(min=1e-12).sqrt()  # (R*,)
    u, _ = torch.linalg.qr(torch.randn(m, cfg.rank, generator=gen, dtype=torch.float64))
    rms_out = (inputs @ weight.double().T).norm(dim=1).pow(2).mean().sqrt()
    g = cfg.strength * rms_out / cfg.rank ** 0.5
    if keep is not None:
        u, sigma, v = u[:, keep], sigma[keep], v[:, keep]
    return (u * (g / sigma)[None, :]) @ v.T


def probe_inputs(model: nn.Module, data: DataConfig, cfg: PlantedConfig) -> torch.Tensor:
    """(tokens, n) float64: what `cfg.layer` of `model`, in eval mode, sees on the probe text,
    the base-model sequences whose second moments the planted directions and their whitening
    come from."""
    probe = next(pretraining_batches(data, cfg.probe_seqs, data.seed))
    was_training = model.training
    model.eval()
    try:
        return layer_inputs(model, model.get_submodule(cfg.layer), probe)
    finally:
        model.train(was_training)


def teacher_from(base: nn.Module, data: DataConfig, cfg: PlantedConfig, inputs: torch.Tensor,
                 keep: list[int] | None = None) -> nn.Module:
    """A copy of `base` whose `cfg.layer` weight has the planted update added, built from the
    layer's probe `inputs` (`probe_inputs`); with `keep`, only those of its R* terms (to build
    many partial teachers from one probe)."""
    teacher = copy.deepcopy(base).eval()
    layer = teacher.get_submodule(cfg.layer)
    delta = planted_delta(layer.weight.detach(), inputs, cfg, generator(data.seed, PLANTED, 0),
                          keep)
    with torch.no_grad():
        layer.weight += delta.to(layer.weight)
    return teacher


def make_teacher(base: nn.Module, data: DataConfig, cfg: PlantedConfig) -> nn.Module:
    """A copy of `base` whose `cfg.layer` weight has the planted update added."""
    return teacher_from(base, data, cfg, probe_inputs(base, data, cfg))


@torch.no_grad()
def continue_with(teacher: nn.Module, seqs: torch.Tensor, prefix: int,
                  gen: torch.Generator) -> torch.Tensor:
    """`seqs` with every token after the first `prefix` resampled from the teacher, in order."""
    out = seqs.clone()
    for t in range(prefix, seqs.shape[1]):
        probs = teacher(out[:, :t])[:, -1].softmax(-1)  # (N, V): next-token law at position t
        out[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return out


def make_planted_data(base: nn.Module, markov: FederatedData,
                      cfg: PlantedDataConfig) -> FederatedData:
    """The synthetic split `markov` (fslora_min/data.py, made from `cfg`) with every sequence
    continued by the teacher."""
    teacher = make_teacher(base, cfg, cfg.planted)
    gen = generator(cfg.seed, PLANTED, 1)
    prefix = cfg.planted.prefix
    clients = [ClientData(continue_with(teacher, c.train, prefix, gen),
                          continue_with(teacher, c.heldout, prefix, gen), c.topic_mix)
               for c in markov.clients]
    heldout = continue_with(teacher, markov.global_heldout, prefix, gen)
    return FederatedData(clients, heldout, markov.base_tables, markov.client_tables,
                         scored_from=prefix - 1)


@torch.no_grad()
def planted_kl(teacher: nn.Module, base: nn.Module, seqs: torch.Tensor,
               scored_from: int) -> float:
    """What the planted change is worth: the mean over scored targets of
    KL(teacher(. | x_<t) || base(. | x_<t)) on teacher-written `seqs`, in nats. It is the base
    model's excess cross-entropy over the teacher's, so the most any adapter can gain."""
    inputs = split_inputs_targets(seqs)[0]
    log_t = teacher(inputs)[:, scored_from:].log_softmax(-1)  # (N, t - scored_from, V)
    log_b = base(inputs)[:, scored_from:].log_softmax(-1)
    return (log_t.exp() * (log_t - log_b)).sum(-1).mean().item()
