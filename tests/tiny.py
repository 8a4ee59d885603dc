"""Tiny configurations that build and run in well under a second, shared by the tests."""

from __future__ import annotations

from fslora_min.client import ClientConfig
from fslora_min.data import DataConfig
from fslora_min.experiment import ExperimentConfig
from fslora_min.federation import FederationConfig
from fslora_min.model import TEST_CONFIG
from fslora_min.pretrain import PretrainConfig
from fslora_min.server import ServerConfig

TINY_DATA = DataConfig(vocab_size=TEST_CONFIG.vocab_size, seq_len=TEST_CONFIG.context,
                       n_base_topics=3, successors=2, train_seqs=12, heldout_seqs=4,
                       global_heldout_seqs=16)


def tiny_experiment(out_dir: str, **federation) -> ExperimentConfig:
    fed = dict(num_clients=4, participants=4, rounds=3, rank=4, lora_alpha=8.0, seed=0) | federation
    return ExperimentConfig(
        ratios=[0.25, 0.5, 1.0], out_dir=out_dir, model=TEST_CONFIG, data=TINY_DATA,
        pretrain=PretrainConfig(steps=150, batch_size=16, lr=1e-2), federation=FederationConfig(**fed),
        client=ClientConfig(local_steps=4, lr=0.3, batch_size=4), server=ServerConfig())
