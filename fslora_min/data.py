"""A synthetic language-modelling task family, generated in code and deterministic by seed.

Text is drawn from "topics": each topic is a Markov chain over the vocabulary whose every token
has a few likely successors (a sparse V x V transition table, plus a little uniform noise).
- Pretraining data mixes `n_base_topics` general topics.
- Fine-tuning topics are shifted copies of the base topics: a fraction `shift` of each table's
  rows get new successors. Learning them means rewriting many (token -> successor) rules at once,
  a high-rank change of the network, so a LoRA of larger rank reaches a lower held-out loss.
- Client i's data mixes the fine-tuning topics with proportions p_i ~ Dirichlet(alpha * 1):
  small alpha concentrates each client on few topics (strong non-IID skew), large alpha makes
  clients alike. The global held-out set mixes all fine-tuning topics equally.
A sequence of `seq_len + 1` tokens gives inputs x = s[:-1] and next-token targets y = s[1:].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fslora_min.knobs import check_knobs, knob
from fslora_min.rng import (DATA_CLIENT, DATA_HELDOUT, DATA_TOPICS, DIRICHLET, PRETRAIN,
                            generator, numpy_rng)


@dataclass
class DataConfig:
    vocab_size: int = 64
    seq_len: int = 64  # tokens per training sequence (<= the model's context)
    n_base_topics: int = 8  # general topics of the pretraining mixture
    successors: int = 3  # likely next tokens per (topic, token)
    noise: float = 0.05  # probability mass spread uniformly over the vocabulary
    shift: float = 0.5  # fraction of each table's rows given new successors for fine-tuning
    dirichlet_alpha: float = knob(0.5, "client topic skew: the Dirichlet concentration of each "
                                       "client's topic mixture (small: strong skew)",
                                  check="positive")
    train_seqs: int = 48  # per client
    heldout_seqs: int = 16  # per client
    global_heldout_seqs: int = 128
    seed: int = 0  # seeds the topics and every data set

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_base_topics", "successors", "train_seqs",
                     "heldout_seqs", "global_heldout_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DataConfig.{name} must be a positive integer, got {value!r}")
        if self.successors > self.vocab_size:
            raise ValueError(f"successors={self.successors} exceeds vocab_size={self.vocab_size}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise!r}")
        if not 0.0 <= self.shift <= 1.0:
            raise ValueError(f"shift must be in [0, 1], got {self.shift!r}")
        check_knobs(self)


def make_topic_tables(n_topics: int, vocab: int, successors: int, noise: float,
                      generator: torch.Generator) -> torch.Tensor:
    """(n_topics, V, V) row-stochastic tables: each row puts 1 - noise on a few successors."""
    logits = torch.rand(n_topics, vocab, vocab, generator=generator)
    top = logits.topk(successors, dim=-1).indices  # (topics, V, successors): random successors
    weights = torch.rand(n_topics, vocab, successors, generator=generator) + 0.5
    tables = torch.zeros(n_topics, vocab, vocab)
    tables.scatter_(-1, top, weights / weights.sum(-1, keepdim=True))
    return (1 - noise) * tables + noise / vocab


def shift_topic_tables(tables: torch.Tensor, shift: float, successors: int, noise: float,
                       generator: torch.Generator) -> torch.Tensor:
    """Copies of `tables` whose rows are redrawn with probability `shift` (fine-tuning topics)."""
    n_topics, vocab, _ = tables.shape
    fresh = make_topic_tables(n_topics, vocab, successors, noise, generator)
    redraw = torch.rand(n_topics, vocab, 1, generator=generator) < shift  # (topics, V, 1)
    return torch.where(redraw, fresh, tables)


def sample_sequences(tables: torch.Tensor, topics: torch.Tensor, length: int,
                     generator: torch.Generator) -> torch.Tensor:
    """(N, length) token ids: sequence j walks the Markov chain of topic topics[j]."""
    n, vocab = topics.numel(), tables.shape[-1]
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=generator)
    for t in range(1, length):
        probs = tables[topics, seqs[:, t - 1]]  # (N, V): each row's next-token law
        seqs[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return seqs


def dirichlet_mixtures(n_clients: int, n_topics: int, alpha: float, seed: int) -> torch.Tensor:
    """(n_clients, n_topics) topic proportions, row i ~ Dirichlet(alpha * 1)."""
    rng = numpy_rng(seed, DIRICHLET)
    return torch.from_numpy(rng.dirichlet(np.full(n_topics, alpha), size=n_clients)).float()


@dataclass
class ClientData:
    train: torch.Tensor  # (train_seqs, seq_len + 1)
    heldout: torch.Tensor  # (heldout_seqs, seq_len + 1)
    topic_mix: torch.Tensor | None = None  # (n_topics,) Dirichlet proportions (synthetic task)
    name: str = ""  # who the client is ("play/ROLE" in fslora_min/shakespeare.py)


@dataclass
class FederatedData:
    clients: list[ClientData]
    global_heldout: torch.Tensor  # (global_heldout_seqs, seq_len + 1)
    base_tables: torch.Tensor | None = None  # (n_base_topics, V, V) (synthetic task)
    client_tables: torch.Tensor | None = None  # (n_base_topics, V, V): shifted fine-tuning topics
    # The first target position the loss and the held-out score count: the planted task's
    # first targets are its prefix, not the teacher's text (fslora_min/planted.py).
    scored_from: int = 0


def make_federated_data(cfg: DataConfig, n_clients: int) -> FederatedData:
    """Topics, a Dirichlet(alpha) split of them over clients, and every client's data sets."""
    if not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"number of clients must be a positive integer, got {n_clients!r}")
    g = generator(cfg.seed, DATA_TOPICS)
    base = make_topic_tables(cfg.n_base_topics, cfg.vocab_size, cfg.successors, cfg.noise, g)
    shifted = shift_topic_tables(base, cfg.shift, cfg.successors, cfg.noise, g)
    mixes = dirichlet_mixtures(n_clients, cfg.n_base_topics, cfg.dirichlet_alpha, cfg.seed)
    length = cfg.seq_len + 1
    clients = []
    for i, mix in enumerate(mixes):
        gi = generator(cfg.seed, DATA_CLIENT, i)
        n = cfg.train_seqs + cfg.heldout_seqs
        topics = torch.multinomial(mix, n, replacement=True, generator=gi)
        seqs = sample_sequences(shifted, topics, length, gi)
        clients.append(ClientData(seqs[:cfg.train_seqs], seqs[cfg.train_seqs:], mix,
                                  f"client {i}"))
    gh = generator(cfg.seed, DATA_HELDOUT)
    topics = torch.randint(cfg.n_base_topics, (cfg.global_heldout_seqs,), generator=gh)
    heldout = sample_sequences(shifted, topics, length, gh)
    return FederatedData(clients, heldout, base, shifted)


def pretraining_batches(cfg: DataConfig, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of (batch_size, seq_len + 1) sequences from the base topic mixture."""
    base = make_topic_tables(cfg.n_base_topics, cfg.vocab_size, cfg.successors, cfg.noise,
                             generator(cfg.seed, DATA_TOPICS))
    g = generator(seed, PRETRAIN)
    while True:
        topics = torch.randint(cfg.n_base_topics, (batch_size,), generator=g)
        yield sample_sequences(base, topics, cfg.seq_len + 1, g)


class Minibatches:
    """Endless minibatches of rows of `seqs`, reshuffled every epoch by `generator`.

    An iterator (not a generator function) so that its state, the generator's state, the
    epoch's order and the position in it, can be checkpointed and restored exactly.
    """

    def __init__(self, seqs: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size!r}")
        self.seqs, self.batch_size, self.generator = seqs, batch_size, generator
        self.starts = range(0, len(seqs) - batch_size + 1, batch_size) or range(1)  # per epoch
        self.order: torch.Tensor | None = None  # this epoch's permutation of the rows
        self.position = 0  # batches already drawn in this epoch

    @property
    def batch_shape(self) -> tuple[int, int]:
        """(rows, input tokens per row) of every minibatch this stream yields."""
        return min(self.batch_size, len(self.seqs)), self.seqs.shape[1] - 1

    def __iter__(self) -> Minibatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.order is None or self.position == len(self.starts):
            self.order = torch.randperm(len(self.seqs), generator=self.generator)
            self.position = 0
        start = self.starts[self.position]
        self.position += 1
        return self.seqs[self.order[start:start + self.batch_size]]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        order, position = state["order"], state["position"]
        if order is not None and sorted(order.tolist()) != list(range(len(self.seqs))):
            raise ValueError(f"minibatch order is not a permutation of {len(self.seqs)} rows")
        if not 0 <= position <= len(self.starts):
            raise ValueError(f"minibatch position {position} is outside [0, {len(self.starts)}]")
        self.generator.set_state(state["generator"])
        self.order, self.position = order, position


def minibatches(seqs: torch.Tensor, batch_size: int, generator: torch.Generator) -> Minibatches:
    """Endless minibatches of rows of `seqs`, reshuffled every epoch by `generator`."""
    return Minibatches(seqs, batch_size, generator)


def split_inputs_targets(seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L + 1) sequences -> inputs (N, L) and next-token targets (N, L)."""
    return seqs[:, :-1], seqs[:, 1:]
