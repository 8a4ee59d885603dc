"""The federation loop: T rounds of sample -> sketch -> send -> train locally -> aggregate.

One loop serves FSLoRA and the baselines: a method differs only in its `Method` strategy
(fslora_min/methods.py: which ranks each client trains at which scale, what it is sent, how the
server aggregates). Every random draw comes from its own named stream
(fslora_min/rng.py), so two methods run on one seed see the same participants and minibatches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fslora_min.budgets import validate_ranks
from fslora_min.client import ClientConfig
from fslora_min.data import FederatedData, minibatches, split_inputs_targets
from fslora_min.engine import ENGINES, resolve_engine, train_clients
from fslora_min.lora import ALL_TARGETS
from fslora_min.methods import Method
from fslora_min.model import lm_loss
from fslora_min.rng import MINIBATCHES, PARTICIPANTS, SKETCHES, generator
from fslora_min.server import Server, sample_participants


@dataclass
class FederationConfig:
    num_clients: int = 10  # N
    participants: int = 10  # M per round (M = N: full participation)
    rounds: int = 20  # T
    rank: int = 16  # r, the server's global rank
    lora_alpha: float = 32.0  # s = alpha / r (or alpha / sqrt(r) with rslora)
    rslora: bool = False
    targets: tuple[str, ...] = ALL_TARGETS
    seed: int = 0
    eval_every: int = 1  # rounds between global held-out evaluations (the last is always done)
    engine: str = "auto"  # "sequential", "batched" or "auto" (the faster one on the device)

    def __post_init__(self) -> None:
        for name in ("num_clients", "participants", "rounds", "rank", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.participants > self.num_clients:
            raise ValueError(f"participants={self.participants} exceeds "
                             f"num_clients={self.num_clients}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be positive and finite, got {self.lora_alpha!r}")


@dataclass
class RoundRecord:
    round: int  # 1-based: the global model after this many rounds
    participants: list[int]
    ranks: list[int]  # k_i of each participant
    numbers_down: list[int]  # per participant, summed over modules: k_i (m + n)
    numbers_up: list[int]
    bytes_down: list[int]  # numbers at the factors' dtype
    bytes_up: list[int]
    seconds: float
    heldout_loss: float | None = None
    heldout_acc: float | None = None


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    initial_loss: float = float("nan")
    initial_acc: float = float("nan")
    coverage: dict[str, list[int]] = field(default_factory=dict)  # times each rank was trained

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, seqs: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """Mean next-token cross-entropy and top-1 accuracy of `model` on held-out sequences."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(seqs), batch_size):
        x, y = split_inputs_targets(seqs[start:start + batch_size].to(device))
        logits = model(x)  # (b, t, V)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    return loss_sum / count, correct / count


def lm_batch_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return lm_loss(model, *split_inputs_targets(batch))


class Federation:
    """N clients with budgets k_i around one server; `run()` plays T rounds."""

    def __init__(self, server: Server, data: FederatedData, ranks: list[int],
                 fed: FederationConfig, client: ClientConfig,
                 method: Method | None = None) -> None:
        if len(data.clients) != fed.num_clients or len(ranks) != fed.num_clients:
            raise ValueError(f"num_clients={fed.num_clients}, but {len(data.clients)} client "
                             f"data sets and {len(ranks)} client ranks were given")
        validate_ranks(ranks, server.rank)
        self.server, self.data, self.ranks = server, data, ranks
        self.fed, self.client_cfg = fed, client
        self.method = Method() if method is None else method  # FSLoRA by default
        self.participant_stream = generator(fed.seed, PARTICIPANTS)
        self.sketch_stream = generator(fed.seed, SKETCHES)
        self.batch_streams = [minibatches(c.train, client.batch_size,
                                          generator(fed.seed, MINIBATCHES, i))
                              for i, c in enumerate(data.clients)]
        self.engine = resolve_engine(fed.engine, next(server.model.parameters()).device)
        self.history = History()

    def run_round(self, t: int) -> RoundRecord:
        start = time.perf_counter()
        server, method = self.server, self.method
        participants = sample_participants(self.fed.num_clients, self.fed.participants,
                                           self.participant_stream)
        # local training never moves the server's factors, so all downlinks can be made first
        downlinks = [method.downlink(server, method.sketches(server, self.ranks[i],
                                                             self.sketch_stream))
                     for i in participants]
        updates = train_clients(self.engine, server.model, participants, downlinks,
                                [self.batch_streams[i] for i in participants], lm_batch_loss,
                                self.client_cfg,
                                [len(self.data.clients[i].train) for i in participants])
        down = [method.numbers_down(downlink) for downlink in downlinks]
        up = [sum(db.numel() + da.numel() for db, da in u.deltas.values()) for u in updates]
        method.aggregate(server, updates, downlinks)
        width = next(iter(server.modules.values())).lora_B.element_size()
        record = RoundRecord(t, participants, [self.ranks[i] for i in participants], down, up,
                             [n * width for n in down], [n * width for n in up],
                             time.perf_counter() - start)
        if t % self.fed.eval_every == 0 or t == self.fed.rounds:
            record.heldout_loss, record.heldout_acc = evaluate(server.model,
                                                               self.data.global_heldout)
        return record

    def run(self, progress: bool = True) -> History:
        h = self.history
        h.initial_loss, h.initial_acc = evaluate(self.server.model, self.data.global_heldout)
        bar = tqdm(range(1, self.fed.rounds + 1), desc="rounds", disable=not progress)
        for t in bar:
            record = self.run_round(t)
            h.rounds.append(record)
            if record.heldout_loss is not None:
                bar.set_postfix(loss=f"{record.heldout_loss:.3f}", acc=f"{record.heldout_acc:.3f}")
        h.coverage = {n: c.tolist() for n, c in self.server.coverage.items()}
        return h
