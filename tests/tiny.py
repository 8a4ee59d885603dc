"""Tiny configurations that build and run in well under a second, shared by the tests."""

from __future__ import annotations

import torch

from fslora_min.client import ClientConfig
from fslora_min.data import DataConfig
from fslora_min.experiment import ExperimentConfig
from fslora_min.federation import Federation, FederationConfig
from fslora_min.lora import apply_lora, lora_modules
from fslora_min.data import make_federated_data
from fslora_min.model import TEST_CONFIG, Transformer
from fslora_min.pretrain import PretrainConfig
from fslora_min.server import Server, ServerConfig

TINY_DATA = DataConfig(vocab_size=TEST_CONFIG.vocab_size, seq_len=TEST_CONFIG.context,
                       n_base_topics=3, successors=2, train_seqs=12, heldout_seqs=4,
                       global_heldout_seqs=16)


def tiny_experiment(out_dir: str, **federation) -> ExperimentConfig:
    fed = dict(num_clients=4, participants=4, rounds=3, rank=4, lora_alpha=8.0, seed=0) | federation
    return ExperimentConfig(
        ratios=[0.25, 0.5, 1.0], out_dir=out_dir, model=TEST_CONFIG, data=TINY_DATA,
        pretrain=PretrainConfig(steps=150, batch_size=16, lr=1e-2), federation=FederationConfig(**fed),
        client=ClientConfig(local_steps=4, lr=0.3, batch_size=4), server=ServerConfig())


def tiny_federation(ranks: list[int], r: int, seed: int = 0, local_steps: int = 2,
                    optimizer: str = "sgd", method=None,
                    participants: int | None = None) -> Federation:
    """A random (unpretrained) tiny model with rank-r LoRA, B drawn non-zero so that A also gets
    a gradient from the first step, and one client per entry of `ranks`."""
    torch.manual_seed(seed)
    model = Transformer(TEST_CONFIG)
    apply_lora(model, r, alpha=2.0 * r, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    fed = FederationConfig(num_clients=len(ranks), participants=participants or len(ranks),
                           rounds=3, rank=r, seed=seed)
    client = ClientConfig(local_steps=local_steps, lr=0.3, optimizer=optimizer, batch_size=4)
    data = make_federated_data(TINY_DATA, len(ranks))
    return Federation(Server(model, ServerConfig()), data, ranks, fed, client, method)
