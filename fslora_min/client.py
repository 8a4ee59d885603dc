"""The client side of one FSLoRA round (docs/method.md section 3, steps 3 and 4).

Client i receives, per adapted module, its compact factors b = B[:, I] (m x k_i) and
a = A[I, :] (k_i x n) with the index set I. It trains only them, for H local steps, in the
forward W0 + s (r/k_i) b a, and uploads the deltas (b_H - b_0, a_H - a_0). Its trainable
parameters and optimizer state are the compact factors: they scale with k_i, never with r.
Training b, a directly is exact for any optimizer, where "train B S with gradients scaled by
S^2" is exact only for plain SGD (docs/method.md section 3, last paragraph).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from fslora_min.data import split_inputs_targets
from fslora_min.knobs import check_knobs, knob
from fslora_min.lora import CompactFactors, compact_factors
from fslora_min.model import lm_loss
from fslora_min.sketch import Sketch

OPTIMIZERS = ("sgd", "adamw")
Downlink = dict[str, CompactFactors]  # what the server sends a client: its factors per module
LR_SCALINGS = ("none", "ratio")


@dataclass
class ClientConfig:
    local_steps: int = knob(10, "H, the local optimizer steps each participant takes per round",
                            check="positive integer")
    lr: float = knob(0.2, "local learning rate eta", check="positive")
    lr_scaling: str = knob(
        "none", "client i's learning rate: eta (none) or eta k_i / R (ratio), k_i the ranks it "
                "trains and R the server's rank: k_i / r for fslora and its ablations, hetlora(-"
                "rescaled), fed-plora, flora; 1 (eta unchanged) where clients train all R ranks "
                "(fedavg-min/-full, flasc, ffa-lora, rolora, fedex-lora); flexlora: "
                "k_i / max(r, min(m, n)), its server's rank",
        choices=LR_SCALINGS)
    optimizer: str = knob("sgd", "local optimizer: sgd (the paper's analysis) or adamw; its "
                                 "state is fresh every round", flag="--client-optimizer",
                          choices=OPTIMIZERS)
    weight_decay: float = knob(0.0, "AdamW's weight decay", check="non-negative")
    batch_size: int = knob(16, "sequences per local minibatch", check="positive integer")

    def __post_init__(self) -> None:
        check_knobs(self)


@dataclass
class ClientUpdate:
    """What a client uploads: per module, its index set and the deltas of its compact factors."""

    client_id: int
    sketches: dict[str, Sketch]
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (db (m, k), da (k, n))
    num_examples: int  # the client's training-set size, for data-weighted baselines
    trainable_parameters: int  # numbers the client's optimizer updated: sum k_i (m + n)


def make_optimizer(params: list[torch.Tensor], cfg: ClientConfig,
                   lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_ratio(downlink: dict[str, CompactFactors], lr_scaling: str) -> float:
    """The factor on client i's learning rate: 1 ("none") or k_i / R ("ratio"), k_i the ranks
    it trains and R the rank of the server's LoRA (its sketches' `rank`).

    With "ratio", FSLoRA's client steps at eta k_i / r on a forward scaled by r / k_i.
    """
    if lr_scaling == "none":
        return 1.0
    ranks = {(f.sketch.k, f.sketch.rank) for f in downlink.values()}
    if len(ranks) != 1:
        raise ValueError(f"lr_scaling='ratio' needs one rank k_i per client, but its modules "
                         f"train (k, R) = {sorted(ranks)}")
    k, R = ranks.pop()
    return k / R


def client_update(client_id: int, downlink: dict[str, CompactFactors],
                  trained: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  num_examples: int) -> ClientUpdate:
    """Step 4 of a round (docs/method.md): the upload db = b_H - b_0, da = a_H - a_0 per module,
    from the factors `trained` ends with and the `downlink` it started from."""
    deltas = {name: (b.detach() - downlink[name].b.to(b.device),
                     a.detach() - downlink[name].a.to(a.device))
              for name, (b, a) in trained.items()}
    return upload(client_id, downlink, deltas, num_examples)


def upload(client_id: int, downlink: dict[str, CompactFactors],
           deltas: dict[str, tuple[torch.Tensor, torch.Tensor]],
           num_examples: int) -> ClientUpdate:
    """The ClientUpdate carrying `deltas`, the moves of the factors `downlink` sent."""
    numbers = sum(db.numel() * downlink[n].train_b + da.numel() * downlink[n].train_a
                  for n, (db, da) in deltas.items())  # what was trained; frozen factors stay home
    return ClientUpdate(client_id, {n: f.sketch for n, f in downlink.items()}, deltas,
                        num_examples, numbers)


class ClientDropout(nn.Module):
    """nn.Dropout whose masks come from each client's own generator.

    `generators` holds one per client whose rows the input stacks: the sequential engine
    passes one, the batched engine (fslora_min/engine.py) the P clients of a pass, whose
    (P b, ...) inputs hold client p's rows at [p b, (p + 1) b). Each client draws its (b, ...)
    mask from its own generator, in the same order in both engines, so both train on the same
    masks and a seed replays them.
    """

    def __init__(self, p: float, generators: list[torch.Generator]) -> None:
        super().__init__()
        self.p, self.generators = p, generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        P = len(self.generators)
        if x.shape[0] % P:
            raise ValueError(f"{x.shape[0]} rows cannot be split among {P} clients' masks")
        shape = (x.shape[0] // P, *x.shape[1:])  # one client's (b, ...)
        keep = torch.cat([torch.rand(shape, generator=g, device=x.device, dtype=x.dtype)
                          for g in self.generators]) >= self.p  # (P b, ...)
        return x * keep / (1 - self.p)


@contextmanager
def dropout_masks(model: nn.Module, generators: list[torch.Generator] | None) -> Iterator[None]:
    """Local training: train mode (dropout acts), each nn.Dropout of the model drawing each
    client's masks from its generator (`ClientDropout`; None: nn.Dropout's own, from torch's
    global generator); the model's layers and previous mode afterwards, so evaluation
    (fslora_min/federation.py) runs in eval mode."""
    swapped = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) is nn.Dropout and generators is not None]
    was_training = model.training
    for parent, name, child in swapped:
        setattr(parent, name, ClientDropout(child.p, generators))
    model.train()
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
        model.train(was_training)


def local_factors(downlink: dict[str, CompactFactors],
                  device: torch.device) -> dict[str, CompactFactors]:
    """The client's own copies of b_0, a_0 on `device`, the ones it trains (a fold stays
    frozen): the server's tensors in `downlink` are never written by local training."""
    return {name: CompactFactors(f.b.detach().clone().to(device).requires_grad_(f.train_b),
                                 f.a.detach().clone().to(device).requires_grad_(f.train_a),
                                 f.sketch, f.fold, f.train_b, f.train_a)
            for name, f in downlink.items()}


def trainable(local: dict[str, CompactFactors]) -> list[torch.Tensor]:
    """The factors the client's optimizer steps."""
    return [t for f in local.values() for t in (f.b, f.a) if t.requires_grad]


def train_client(model: nn.Module, client_id: int, downlink: dict[str, CompactFactors],
                 batches: Iterator[torch.Tensor], cfg: ClientConfig,
                 num_examples: int, masks: torch.Generator | None = None,
                 scored_from: int = 0) -> ClientUpdate:
    """H local steps of one client on its compact factors (step 3 of a round), in train mode;
    its upload. `masks` draws the model's dropout masks (the federation passes this round's and
    client's stream, fslora_min/rng.py; None: torch's global generator); `scored_from` is the
    data's first scored target (`FederatedData.scored_from`).

    The one-client reference: by default a round's clients are trained together by
    `engine.train_clients_batched`, which is tested against this. `downlink` holds the server's
    copies of b_0, a_0; the client trains clones of them, so the server's tensors are never
    written here.
    """
    device = next(model.parameters()).device
    local = local_factors(downlink, device)
    opt = make_optimizer(trainable(local), cfg, cfg.lr * lr_ratio(downlink, cfg.lr_scaling))
    with compact_factors(model, local), dropout_masks(model, None if masks is None else [masks]):
        for _ in range(cfg.local_steps):
            loss = lm_loss(model, *split_inputs_targets(next(batches).to(device)),
                           scored_from=scored_from)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return client_update(client_id, downlink, {n: (f.b, f.a) for n, f in local.items()},
                         num_examples)
