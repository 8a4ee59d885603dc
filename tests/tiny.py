"""Tiny configurations that build and run in well under a second, shared by the tests."""

from __future__ import annotations

import dataclasses

import torch

from fslora_min.client import ClientConfig
from fslora_min.compute import ComputeConfig
from fslora_min.data import make_federated_data
from fslora_min.experiment import ExperimentConfig, preset
from fslora_min.federation import Federation, FederationConfig
from fslora_min.lora import LoRAConfig, apply_lora, lora_modules
from fslora_min.model import Transformer
from fslora_min.server import Server, ServerConfig

TEST_CONFIG, TINY_DATA, TINY_PRETRAIN = preset("tiny")[:3]  # the CLI's --preset tiny


def tiny_experiment(out_dir: str, **knobs) -> ExperimentConfig:
    """A tiny experiment; `knobs` set fields of its FederationConfig or ComputeConfig by name."""
    compute = {name: knobs.pop(name) for name in list(knobs)
               if name in {f.name for f in dataclasses.fields(ComputeConfig)}}
    fed = dict(num_clients=4, participants=4, rounds=3, seed=0) | knobs
    return ExperimentConfig(
        ratios=[0.25, 0.5, 1.0], out_dir=out_dir, model=TEST_CONFIG, data=TINY_DATA,
        pretrain=TINY_PRETRAIN, lora=LoRAConfig(rank=4, alpha=8.0),
        federation=FederationConfig(**fed),
        client=ClientConfig(local_steps=4, lr=0.3, batch_size=4), server=ServerConfig(),
        compute=ComputeConfig(**compute))


def tiny_lora_model(r: int, dropout: float = 0.0) -> Transformer:
    """A random (unpretrained) tiny model with rank-r LoRA (alpha = 2r), B drawn non-zero so
    that A also gets a gradient from the first step; the same numbers on every call."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TEST_CONFIG, dropout=dropout))
    apply_lora(model, r, alpha=2.0 * r, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def tiny_federation(ranks: list[int], r: int, local_steps: int = 2, optimizer: str = "sgd",
                    method=None) -> Federation:
    """`tiny_lora_model(r)` and one client per entry of `ranks`, all taking part."""
    model = tiny_lora_model(r)
    fed = FederationConfig(num_clients=len(ranks), participants=len(ranks), rounds=3, seed=0)
    client = ClientConfig(local_steps=local_steps, lr=0.3, optimizer=optimizer, batch_size=4)
    data = make_federated_data(TINY_DATA, len(ranks))
    return Federation(Server(model, ServerConfig()), data, ranks, fed, client, method)
