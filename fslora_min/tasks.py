"""Which data a run learns from: a task is named by the type of its data config.

- "synthetic": the topic-Markov language generated in code (fslora_min/data.py, `DataConfig`);
- "shakespeare": LEAF's next-character task on the shipped plays, one client per speaking role
  (fslora_min/shakespeare.py, `ShakespeareConfig`).

(The linear task, fslora_min/linear.py, is not one of these: its squared loss on one linear map
does not fit the language-model loss of the federation's clients, so it plays the same round
with the same Server and Method objects through a small adapter of its own.)

Both give the same `FederatedData` and the same endless pretraining stream of (batch,
seq_len + 1) token windows, so pretraining, the federation, evaluation and every method run one
code path whatever the task.
"""

from __future__ import annotations

from typing import Iterator, Union

import torch

from fslora_min.data import DataConfig, FederatedData, make_federated_data, pretraining_batches
from fslora_min.shakespeare import (ShakespeareConfig, make_shakespeare_data,
                                    shakespeare_pretraining_batches)

TASKS = ("synthetic", "shakespeare")
TaskConfig = Union[DataConfig, ShakespeareConfig]


def task_name(cfg: TaskConfig) -> str:
    if isinstance(cfg, ShakespeareConfig):
        return "shakespeare"
    if isinstance(cfg, DataConfig):
        return "synthetic"
    raise TypeError(f"not a task's data config: {type(cfg).__name__}")


def federated_data(cfg: TaskConfig, n_clients: int) -> FederatedData:
    """Every client's training and held-out sequences, and the global held-out set."""
    if task_name(cfg) == "shakespeare":
        return make_shakespeare_data(cfg, n_clients)
    return make_federated_data(cfg, n_clients)


def pretraining_stream(cfg: TaskConfig, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The base model's corpus: the base topic mixture, or the plays without clients."""
    if task_name(cfg) == "shakespeare":
        return shakespeare_pretraining_batches(cfg, batch_size, seed)
    return pretraining_batches(cfg, batch_size, seed)
