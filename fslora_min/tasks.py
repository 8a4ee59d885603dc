"""Which data a run learns from: a task is named by the type of its data config.

- "synthetic": the topic-Markov language generated in code (fslora_min/data.py, `DataConfig`);
- "shakespeare": LEAF's next-character task on the shipped plays, one client per speaking role
  (fslora_min/shakespeare.py, `ShakespeareConfig`);
- "planted": the synthetic clients' text continued by a teacher, the base model with a planted
  rank-R* update of one layer, so that adapter rank binds (fslora_min/planted.py,
  `PlantedDataConfig`).

(The linear task, fslora_min/linear.py, is not one of these: its squared loss on one linear map
does not fit the language-model loss of the federation's clients, so it plays the same round
with the same Server and Method objects through a small adapter of its own.)

All give the same `FederatedData` and the same endless pretraining stream of (batch,
seq_len + 1) token windows, so pretraining, the federation, evaluation and every method run one
code path whatever the task.
"""

from __future__ import annotations

from typing import Iterator, Union

import torch
import torch.nn as nn

from fslora_min.data import DataConfig, FederatedData, make_federated_data, pretraining_batches
from fslora_min.planted import PlantedDataConfig, make_planted_data
from fslora_min.shakespeare import (ShakespeareConfig, make_shakespeare_data,
                                    shakespeare_pretraining_batches)

TASKS = ("synthetic", "shakespeare", "planted")
TaskConfig = Union[DataConfig, ShakespeareConfig, PlantedDataConfig]


def task_name(cfg: TaskConfig) -> str:
    if isinstance(cfg, ShakespeareConfig):
        return "shakespeare"
    if isinstance(cfg, PlantedDataConfig):  # before DataConfig, which it extends
        return "planted"
    if isinstance(cfg, DataConfig):
        return "synthetic"
    raise TypeError(f"not a task's data config: {type(cfg).__name__}")


def federated_data(cfg: TaskConfig, n_clients: int) -> FederatedData:
    """Every client's training and held-out sequences, and the global held-out set (the planted
    task's as the synthetic task writes them, before `on_base` hands them to the teacher)."""
    if task_name(cfg) == "shakespeare":
        return make_shakespeare_data(cfg, n_clients)
    return make_federated_data(cfg, n_clients)


def on_base(cfg: TaskConfig, data: FederatedData, base: nn.Module) -> FederatedData:
    """What the task's data needs the pretrained base for: the planted task's teacher continues
    every sequence of `data`; any other task's data is already complete."""
    if task_name(cfg) == "planted":
        return make_planted_data(base, data, cfg)
    return data


def pretraining_stream(cfg: TaskConfig, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The base model's corpus: the base topic mixture (the synthetic and planted tasks'), or the
    plays without clients."""
    if task_name(cfg) == "shakespeare":
        return shakespeare_pretraining_batches(cfg, batch_size, seed)
    return pretraining_batches(cfg, batch_size, seed)
