"""The server side of one FSLoRA round (docs/method.md section 3, steps 1, 2 and 5).

The server holds the global factors X = [B; A] (the LoRA layers of its model), samples the
participants, sends each its compact factors b = B[:, I], a = A[I, :], zero-pads the deltas
it gets back to full rank at I and averages them over the participants,

    D = (1 / |P_t|) * sum_{i in P_t} pad_I(d_i),       X <- X + eta_g * D,

or hands -D as a pseudo-gradient to a server optimizer (SGD with momentum, Adam, AdamW: FedOpt).
It counts the numbers each client moves and how often each rank index was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from fslora_min.client import ClientUpdate
from fslora_min.knobs import check_knobs, knob
from fslora_min.lora import CompactFactors, lora_modules
from fslora_min.sketch import Sketch

SERVER_OPTIMIZERS = ("avg", "sgdm", "adam", "adamw")
AGGREGATIONS = ("participants", "coverage", "data")  # per-rank normalizers


@dataclass
class ServerConfig:
    optimizer: str = knob("avg", "avg: X <- X + eta_g D; sgdm / adam / adamw: FedOpt steps on "
                                 "the pseudo-gradient -D", flag="--server-optimizer",
                          choices=SERVER_OPTIMIZERS)
    server_lr: float = knob(1.0, "server step eta_g", aliases=("--global-lr",), check="positive")
    momentum: float = knob(0.9, "the sgdm server optimizer's momentum", flag="--server-momentum",
                           check="probability")
    weight_decay: float = knob(0.01, "the adamw server optimizer's weight decay (PyTorch's "
                                     "default, as the FSLoRA authors' code runs it)",
                               flag="--server-weight-decay", check="non-negative")
    aggregation: str = knob("participants", "per rank index: divide the summed deltas by the "
                                            "participants (participants, the paper), by the "
                                            "clients that drew it (coverage), or weight them "
                                            "by the data of the clients that drew it (data: "
                                            "RB-LoRA)", choices=AGGREGATIONS)

    def __post_init__(self) -> None:
        check_knobs(self)


def sample_participants(num_clients: int, participants: int,
                        generator: torch.Generator) -> list[int]:
    """P_t: M of the N clients, uniformly without replacement (sorted)."""
    if not 1 <= participants <= num_clients:
        raise ValueError(f"participants per round must be in [1, {num_clients}] "
                         f"(the number of clients), got {participants!r}")
    return sorted(torch.randperm(num_clients, generator=generator)[:participants].tolist())


def round_index(sketches: list[Sketch]) -> np.ndarray:
    """The index sets of one module across clients, side by side (sum k,), on the host: the
    server's own copy, so that reading it never waits on a device."""
    return np.concatenate([s.indices.detach().cpu().numpy() for s in sketches])


def index_normalizer(drawn: np.ndarray, data_drawn: np.ndarray, participants: int,
                     normalizer: str) -> np.ndarray:
    """The per-rank divisor c_j of D_j = (1 / c_j) sum_{i in P, j in I_i} w_i d_ij, shape (r,).

    "participants" (FSLoRA, arXiv 2501.19389): c_j = |P|, w_i = 1;
    "coverage": c_j = #{i in P : j in I_i}, w_i = 1 (the mean over the clients that drew j);
    "data" (RB-LoRA, Findings of EACL 2026, as this project reads it): c_j = sum_{i in P, j in
    I_i} n_i, w_i = n_i (the data-weighted mean over the clients that drew j).
    An index nobody drew has a zero numerator; its divisor is set to 1 so it stays zero.
    """
    if normalizer == "participants":
        return np.full(drawn.shape, float(participants))
    count = drawn if normalizer == "coverage" else data_drawn
    return np.where(count > 0, count, 1).astype(np.float64)


def average_padded_deltas(updates: list[ClientUpdate], r: int,
                          normalizer: str = "participants",
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """D = (1/|P|) sum_i pad_I_i(d_i) per module (docs/method.md section 3, step 5), or per rank j
    the mean over the clients that drew j, plain or data-weighted (`index_normalizer`).

    Per module the clients' deltas are laid side by side, (m, sum k) and (sum k, n), written
    into the zero-padded (P, r, m) and (P, r, n) at (client, rank) and summed over the clients:
    a handful of operations for any number of clients, in a fixed order on any device (on a
    CPU, up to 16 clients a round, the sequential sum's very bits; beyond that torch's cascaded
    sum differs from it by float rounding). (`index_add_` into (r, m) would be one
    operation less, but on a GPU it adds a rank's deltas by atomics, in a varying order, and a
    resumed run would no longer replay bit for bit.) The counts per rank come from the server's
    host copies of the index sets.
    """
    if not updates:
        raise ValueError("cannot aggregate an empty list of client updates")
    if normalizer not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {normalizer!r}")
    examples = np.array([u.num_examples for u in updates], dtype=np.float64)  # n_i
    result = {}
    for name in updates[0].deltas:
        sketches = [u.sketches[name] for u in updates]
        index = round_index(sketches)  # (sum k,)
        column_examples = np.repeat(examples, [s.k for s in sketches])  # n_i of each column
        db = torch.cat([u.deltas[name][0] for u in updates], 1)  # (m, sum k)
        da = torch.cat([u.deltas[name][1] for u in updates], 0)  # (sum k, n)
        if normalizer == "data":  # w_i = n_i
            w = torch.from_numpy(column_examples).to(db)
            db, da = db * w, da * w[:, None]
        owner = np.repeat(np.arange(len(updates)), [s.k for s in sketches])  # client of each
        at = tuple(torch.from_numpy(x).to(db.device) for x in (owner, index))
        sum_b = db.new_zeros(len(updates), r, db.shape[0]).index_put_(at, db.t()).sum(0).t()
        sum_a = da.new_zeros(len(updates), r, da.shape[1]).index_put_(at, da).sum(0)  # (r, n)
        c = torch.from_numpy(index_normalizer(
            np.bincount(index, minlength=r), np.bincount(index, column_examples, minlength=r),
            len(updates), normalizer)).to(sum_b)  # (r,)
        result[name] = (sum_b / c[None, :], sum_a / c[:, None])
    return result


class Server:
    """Holds the global LoRA factors in `model` and applies aggregated client updates."""

    def __init__(self, model: nn.Module, cfg: ServerConfig) -> None:
        self.model, self.cfg = model, cfg
        self.modules = dict(lora_modules(model))
        if not self.modules:
            raise ValueError("the server's model has no LoRA layers: call apply_lora first")
        self.rank = next(iter(self.modules.values())).r
        self.shapes = {n: (m.out_features, m.in_features) for n, m in self.modules.items()}
        self.coverage = {n: torch.zeros(self.rank, dtype=torch.long) for n in self.modules}
        params = [p for m in self.modules.values() for p in (m.lora_B, m.lora_A)]
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.server_lr)
        elif cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.server_lr,
                                               weight_decay=cfg.weight_decay)
        else:  # "avg" is SGD without momentum on -D: X - eta_g (-D) = X + eta_g D
            momentum = cfg.momentum if cfg.optimizer == "sgdm" else 0.0
            self.optimizer = torch.optim.SGD(params, lr=cfg.server_lr, momentum=momentum)

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    def downlink(self, sketches: dict[str, Sketch]) -> dict[str, CompactFactors]:
        """b = B[:, I] (m x k) and a = A[I, :] (k x n) per module: what the client receives."""
        return self.downlinks([sketches])[0]

    def downlinks(self, sketches: list[dict[str, Sketch]]) -> list[dict[str, CompactFactors]]:
        """Every participant's `downlink` at once: per module one gather of the columns of B
        and rows of A at all of the round's index sets, each client's b, a a view of it (copies
        of the global factors, so a later server step never reaches them)."""
        gathered: dict[str, list[CompactFactors]] = {}
        for name in dict.fromkeys(n for s in sketches for n in s):
            layer, mine = self.modules[name], [s[name] for s in sketches if name in s]
            at = torch.from_numpy(round_index(mine)).to(layer.lora_B.device)
            b = layer.lora_B.detach().index_select(1, at)  # (m, sum k)
            a = layer.lora_A.detach().index_select(0, at)  # (sum k, n)
            ends = np.cumsum([sk.k for sk in mine]).tolist()
            gathered[name] = [CompactFactors(b[:, end - sk.k:end], a[end - sk.k:end], sk)
                              for sk, end in zip(mine, ends)]
        each = {name: iter(factors) for name, factors in gathered.items()}
        return [{name: next(each[name]) for name in s} for s in sketches]

    def count_coverage(self, updates: list[ClientUpdate]) -> None:
        """Add one to each rank index of each module that a client trained this round."""
        if not updates:
            return
        for name in updates[0].sketches:
            index = round_index([u.sketches[name] for u in updates])
            self.coverage[name] += torch.from_numpy(np.bincount(index, minlength=self.rank))

    def apply_updates(self, updates: list[ClientUpdate]) -> None:
        """Average the padded deltas and step the global factors; count rank coverage."""
        deltas = average_padded_deltas(updates, self.rank, self.cfg.aggregation)
        self.count_coverage(updates)
        for name, (d_b, d_a) in deltas.items():
            layer = self.modules[name]
            layer.lora_B.grad = -d_b.to(layer.lora_B)  # pseudo-gradient -D
            layer.lora_A.grad = -d_a.to(layer.lora_A)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """The whole model (W0 too: FLoRA merges into it), the optimizer state, the coverage."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "coverage": {n: c.clone() for n, c in self.coverage.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; tensors of another shape (other model or rank) are an error."""
        own = self.model.state_dict()
        for name, value in state["model"].items():
            if name in own and tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"{name} has shape {tuple(value.shape)} in the checkpoint but "
                                 f"{tuple(own[name].shape)} in this run (another model size or "
                                 f"rank r)")
        if set(state["coverage"]) != set(self.coverage):
            raise ValueError("the checkpoint's LoRA modules differ from this run's")
        self.model.load_state_dict(state["model"])  # strict: names a missing or extra tensor
        self.optimizer.load_state_dict(state["optimizer"])
        self.coverage = {n: c.clone() for n, c in state["coverage"].items()}
