"""The federation loop: T rounds of sample -> sketch -> send -> train locally -> aggregate.

One loop serves FSLoRA and the baselines: a method differs only in its `Method` strategy
(fslora_min/methods.py: which ranks each client trains at which scale, what it is sent, how the
server aggregates). Every random draw comes from its own named stream
(fslora_min/rng.py), so two methods run on one seed see the same participants and minibatches.

Reliability: each participant fails mid-round with probability `dropout` (after its
download, before its upload); the server screens every upload (fslora_min/validation.py) and
aggregates over the participants that reported a valid update, R_t:
D = (1/|R_t|) sum_{i in R_t} pad(d_i). If R_t is empty the global model does not move. Since
failures are independent of the clients and the sketches, R_t given |R_t| = m is a uniform
m-subset of the clients, so D stays unbiased given R_t is not empty; over all rounds
E[D] = (1 - dropout^M) times the no-dropout mean (the all-dropped rounds add nothing), and the
variance grows like 1/|R_t|. `state_dict()` holds everything a bit-identical resume needs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fslora_min.client import ClientConfig, ClientUpdate, Downlink
from fslora_min.compute import ComputeConfig
from fslora_min.data import FederatedData, minibatches, split_inputs_targets
from fslora_min.engine import default_clients_per_pass, resolve_engine, train_clients
from fslora_min.knobs import ConfigError, check_knobs, knob
from fslora_min.methods import Method
from fslora_min.ranks import validate_ranks
from fslora_min.rng import DROPOUT, MASKS, MINIBATCHES, PARTICIPANTS, SKETCHES, generator
from fslora_min.server import Server, sample_participants
from fslora_min.validation import screen_updates

log = logging.getLogger(__name__)


@dataclass
class FederationConfig:
    num_clients: int = knob(10, "number of clients N", flag="--clients", check="positive integer")
    participants: int | None = knob(None, "clients per round M, sampled uniformly (M = N: full "
                                          "participation)", check="positive integer",
                                    default_text="all N")
    rounds: int = knob(20, "communication rounds T", check="positive integer")
    seed: int = knob(0, "seeds every random stream (fslora_min/rng.py)",
                     check="non-negative integer")
    eval_every: int = knob(1, "rounds between global held-out evaluations (the last round is "
                              "always evaluated)", check="positive integer")
    dropout: float = knob(0.0, "probability that a participant fails mid-round (after its "
                               "download, before its upload)", check="probability")
    client_eval: bool = knob(True, "at each evaluation, also score every client on its own "
                                   "held-out set (else only before round 1 and after the last; "
                                   "it never changes training)")

    def __post_init__(self) -> None:
        if self.participants is None:
            self.participants = self.num_clients
        check_knobs(self)
        if self.participants > self.num_clients:
            raise ConfigError(self, "participants", f"must be at most the number of clients, "
                                                    f"{self.num_clients}, got {self.participants}")


@dataclass
class RoundRecord:
    round: int  # 1-based: the global model after this many rounds
    participants: list[int]
    client_ranks: list[int]  # k_i of each participant
    numbers_down: list[int]  # per participant, summed over modules: k_i (m + n)
    numbers_up: list[int]  # 0 for a participant that dropped out
    bytes_down: list[int]  # numbers at the factors' dtype
    bytes_up: list[int]
    seconds: float
    heldout_loss: float | None = None
    heldout_acc: float | None = None
    client_heldout_loss: list[float] | None = None  # each client's own held-out set, in order
    client_heldout_acc: list[float] | None = None
    dropped: list[int] = field(default_factory=list)  # participants that failed mid-round
    rejected: list[int] = field(default_factory=list)  # participants whose update was refused
    reasons: list[str] = field(default_factory=list)  # why, one line per rejected update


@dataclass
class RoundPlan:
    """What the server decides at the start of a round, before any client trains."""

    participants: list[int]  # client ids, in the order their sketches were drawn
    downlinks: list[Downlink]  # what each participant receives
    fails: list[bool]  # simulated dropout (FederationConfig.dropout): never reports

    @property
    def live(self) -> list[int]:
        """Positions in `participants` of those that do not drop out."""
        return [p for p, failed in enumerate(self.fails) if not failed]


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    initial_loss: float = float("nan")
    initial_acc: float = float("nan")
    coverage: dict[str, list[int]] = field(default_factory=dict)  # times each rank was trained
    initial_client_loss: list[float] = field(default_factory=list)  # before round 1, per client
    initial_client_acc: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def stalled(self) -> str | None:
        """A one-line summary if no round applied any update (so the global model is the
        initial one: every upload rejected, or every participant dropped), else None."""
        dropped = sum(len(r.dropped) for r in self.rounds)
        reported = sum(len(r.participants) for r in self.rounds) - dropped
        rejected = [(c, why) for r in self.rounds for c, why in zip(r.rejected, r.reasons)]
        if not self.rounds or len(rejected) < reported:
            return None
        first = f" (the first: client {rejected[0][0]}, {rejected[0][1]})" if rejected else ""
        return (f"no update was applied in {len(self.rounds)} rounds: {len(rejected)} of "
                f"{reported} uploads were rejected{first} and {dropped} participants dropped "
                f"out, so the global model is the initial one")

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls([RoundRecord(**r) for r in d["rounds"]], d["initial_loss"],
                   d["initial_acc"], d["coverage"], d["initial_client_loss"],
                   d["initial_client_acc"])


@torch.no_grad()
def evaluate(model: nn.Module, seqs: torch.Tensor, batch_size: int = 64,
             scored_from: int = 0) -> tuple[float, float]:
    """Mean next-token cross-entropy and top-1 accuracy of `model` on held-out sequences, over
    the target positions >= `scored_from` (`FederatedData.scored_from`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(seqs), batch_size):
        x, y = split_inputs_targets(seqs[start:start + batch_size].to(device))
        logits = model(x)  # (b, t, V)
        if scored_from:
            logits, y = logits[:, scored_from:], y[:, scored_from:]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    return loss_sum / count, correct / count


def evaluate_clients(model: nn.Module, data: FederatedData) -> tuple[list[float], list[float]]:
    """Each client's held-out loss and accuracy on its own held-out set (its own distribution:
    a role's style, a client's topic mix), beside the global set's pooled numbers."""
    scores = [evaluate(model, c.heldout, scored_from=data.scored_from) for c in data.clients]
    return [loss for loss, _ in scores], [acc for _, acc in scores]


def mask_stream(seed: int, t: int, client: int, device: torch.device) -> torch.Generator:
    """Client `client`'s dropout masks in round t: a stream of its own, so the masks do not
    depend on the engine, on the other clients or on a resume (fslora_min/model.py `Dropout`)."""
    return generator(seed, MASKS, t, client, device=device)


class Federation:
    """N clients of ranks k_i around one server; `run()` plays T rounds."""

    def __init__(self, server: Server, data: FederatedData, client_ranks: list[int],
                 fed: FederationConfig, client: ClientConfig, method: Method | None = None,
                 compute: ComputeConfig | None = None) -> None:
        if len(data.clients) != fed.num_clients or len(client_ranks) != fed.num_clients:
            raise ValueError(f"num_clients={fed.num_clients}, but {len(data.clients)} client "
                             f"data sets and {len(client_ranks)} client ranks were given")
        validate_ranks(client_ranks, server.rank)
        self.server, self.data, self.client_ranks = server, data, client_ranks
        self.fed, self.client_cfg = fed, client
        self.method = Method() if method is None else method  # FSLoRA by default
        self.participant_stream = generator(fed.seed, PARTICIPANTS)
        self.sketch_stream = generator(fed.seed, SKETCHES)
        self.dropout_stream = generator(fed.seed, DROPOUT)
        self.batch_streams = [minibatches(c.train, client.batch_size,
                                          generator(fed.seed, MINIBATCHES, i))
                              for i, c in enumerate(data.clients)]
        compute = ComputeConfig() if compute is None else compute
        self.engine = resolve_engine(compute.engine, next(server.model.parameters()).device)
        # batched engine: fixed by the device, the model and the minibatch shape, so set once
        self.clients_per_pass = (compute.clients_per_pass
                                 or default_clients_per_pass(server.model, self.batch_streams))
        self.history = History()

    def run_round(self, t: int, plan: RoundPlan | None = None) -> RoundRecord:
        """One round in process: plan it (unless `plan` is given), train the participants that
        report, close it."""
        start = time.perf_counter()
        plan = self.plan_round() if plan is None else plan
        live = plan.live
        reporters = [plan.participants[p] for p in live]
        device = next(self.server.model.parameters()).device
        updates = train_clients(self.engine, self.server.model, reporters,
                                [plan.downlinks[p] for p in live],
                                [self.batch_streams[i] for i in reporters], self.client_cfg,
                                [len(self.data.clients[i].train) for i in reporters],
                                self.clients_per_pass,
                                [mask_stream(self.fed.seed, t, i, device) for i in reporters],
                                self.data.scored_from)
        updates = [self.method.client_upload(u, plan.downlinks[p])  # e.g. FLASC's top-k
                   for u, p in zip(updates, live)]
        return self.close_round(t, plan, live, updates, start)

    def plan_round(self) -> RoundPlan:
        """The server's first half of a round: participants, their downlinks, who drops out."""
        server, method = self.server, self.method
        participants = sample_participants(self.fed.num_clients, self.fed.participants,
                                           self.participant_stream)
        # local training never moves the server's factors, so all downlinks can be made first
        sketches = [method.sketches(server, self.client_ranks[i], self.sketch_stream)
                    for i in participants]
        if type(method).downlink is Method.downlink:  # the server's own: one gather per module
            downlinks = server.downlinks(sketches)
        else:
            downlinks = [method.downlink(server, s) for s in sketches]
        # one draw per participant, always, so the other streams never depend on `dropout`
        fails = (torch.rand(len(participants), generator=self.dropout_stream)
                 < self.fed.dropout).tolist()
        return RoundPlan(participants, downlinks, fails)

    def close_round(self, t: int, plan: RoundPlan, live: list[int],
                    updates: list[ClientUpdate], start: float,
                    unreadable: list[tuple[int, str]] = ()) -> RoundRecord:
        """The server's second half: screen and aggregate the updates, account, evaluate.

        `updates[j]` is the upload of participant `plan.participants[live[j]]`. `unreadable`
        lists (client, reason) for replies that arrived but could not be decoded (a deployment,
        flower_app/); they are rejected with the screened-out ones. Every other participant
        dropped out (simulated by `plan.fails`, or really, in a deployment).
        """
        server = self.server
        reporters = [plan.participants[p] for p in live]
        down = [self.method.numbers_down(downlink) for downlink in plan.downlinks]
        up = [0] * len(plan.participants)
        for p, u in zip(live, updates):
            up[p] = self.method.numbers_up(u, plan.downlinks[p])
        rejected = self.aggregate(updates, reporters, [plan.downlinks[p] for p in live])
        rejected += list(unreadable)
        width = next(iter(server.modules.values())).lora_B.element_size()
        refused = {i for i, _ in unreadable}
        dropped = [i for p, i in enumerate(plan.participants)
                   if p not in live and i not in refused]
        ranks = [self.client_ranks[i] for i in plan.participants]
        record = RoundRecord(t, plan.participants, ranks,
                             down, up, [n * width for n in down], [n * width for n in up],
                             time.perf_counter() - start, dropped=dropped,
                             rejected=[i for i, _ in rejected],
                             reasons=[reason for _, reason in rejected])
        if t % self.fed.eval_every == 0 or t == self.fed.rounds:
            record.heldout_loss, record.heldout_acc = evaluate(
                server.model, self.data.global_heldout, scored_from=self.data.scored_from)
            if self.fed.client_eval or t == self.fed.rounds:
                record.client_heldout_loss, record.client_heldout_acc = evaluate_clients(
                    server.model, self.data)
        return record

    def aggregate(self, updates: list[ClientUpdate], clients: list[int],
                  downlinks: list[Downlink]) -> list[tuple[int, str]]:
        """Screen the uploads, aggregate the valid ones (if any); return the refused as
        (client, reason)."""
        good, rejected = screen_updates(updates, clients, downlinks, self.server.rank)
        for client, reason in rejected:
            log.warning("rejected the update of client %d: %s", client, reason)
        if good:  # nobody reported a valid update: the global model stays as it is
            self.method.aggregate(self.server, [updates[g] for g in good],
                                  [downlinks[g] for g in good])
        return rejected

    def run(self, progress: bool = True, every: int = 0,
            save: Callable[[dict], None] | None = None) -> History:
        """Play the rounds left (all of them, or those after a loaded checkpoint).

        With `save`, `save(self.state_dict())` runs after every `every`-th round and the last.
        """
        h = self.history
        if not h.rounds:
            h.initial_loss, h.initial_acc = evaluate(self.server.model, self.data.global_heldout,
                                                     scored_from=self.data.scored_from)
            h.initial_client_loss, h.initial_client_acc = evaluate_clients(self.server.model,
                                                                           self.data)
        bar = tqdm(range(len(h.rounds) + 1, self.fed.rounds + 1), desc="rounds",
                   disable=not progress)
        for t in bar:
            record = self.run_round(t)
            self.record_round(record)
            if record.heldout_loss is not None:
                bar.set_postfix(loss=f"{record.heldout_loss:.3f}", acc=f"{record.heldout_acc:.3f}")
            if save is not None and every and (t % every == 0 or t == self.fed.rounds):
                save(self.state_dict())
        return h

    def record_round(self, record: RoundRecord) -> None:
        """Add a closed round to the history, with the rank coverage so far."""
        self.history.rounds.append(record)
        self.history.coverage = {n: c.tolist() for n, c in self.server.coverage.items()}

    def streams(self) -> dict[str, torch.Generator]:
        return {"participants": self.participant_stream, "sketches": self.sketch_stream,
                "dropout": self.dropout_stream}

    def state_dict(self) -> dict:
        """Everything a resume needs: server and method state, every random stream, metrics."""
        return {"server": self.server.state_dict(), "method": self.method.state_dict(),
                "streams": {name: g.get_state() for name, g in self.streams().items()},
                "minibatches": [b.state_dict() for b in self.batch_streams],
                "torch_rng": torch.get_rng_state(), "history": self.history.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: `run()` then plays the rounds after the saved one."""
        if len(state["minibatches"]) != len(self.batch_streams):
            raise ValueError(f"the checkpoint has {len(state['minibatches'])} clients, "
                             f"this run {len(self.batch_streams)}")
        self.server.load_state_dict(state["server"])
        self.method.load_state_dict(state["method"])
        for name, g in self.streams().items():
            g.set_state(state["streams"][name])
        for stream, saved in zip(self.batch_streams, state["minibatches"]):
            stream.load_state_dict(saved)
        torch.set_rng_state(state["torch_rng"])
        self.history = History.from_dict(state["history"])
