"""Pretrain the base model on the task's pretraining corpus, or reuse a cached copy.

The cache file is keyed by everything that determines the weights' bits: the model and data
configs, steps, batch size, learning rate and seed, and the numerics they were computed with
(`numerics`: torch's version, its CPU kernels and its thread count: the same run at 1 and at 2
threads sums in another order and ends in other weights). It is a sealed file
(fslora_min/sealed.py): a plain state dict behind its SHA-256, loaded with
`torch.load(..., weights_only=True)`; a damaged one is pretrained again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fslora_min.data import split_inputs_targets
from fslora_min.knobs import check_knobs, knob
from fslora_min.model import ModelConfig, Transformer, lm_loss
from fslora_min.sealed import read_sealed, write_sealed
from fslora_min.tasks import TaskConfig, pretraining_stream


CACHE_MAGIC = b"FSLORAbm"  # a sealed base-model state dict


@dataclass
class PretrainConfig:
    steps: int = knob(300, "base-model pretraining steps (the base is cached by its whole "
                           "configuration)", flag="--pretrain-steps", check="positive integer")
    batch_size: int = 32
    lr: float = 3e-3  # AdamW, cosine-decayed to zero
    seed: int = 0

    def __post_init__(self) -> None:
        check_knobs(self)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"pretrain batch_size must be a positive integer, "
                             f"got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"pretrain lr must be positive, got {self.lr!r}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FSLORA_CACHE", Path.cwd() / ".cache"))


def pretrain(model_cfg: ModelConfig, data_cfg: TaskConfig, cfg: PretrainConfig,
             progress: bool = True) -> Transformer:
    """AdamW on next-token loss over the task's pretraining corpus; returns the model (on CPU)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    stream = pretraining_stream(data_cfg, cfg.batch_size, cfg.seed)
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, leave=False)
    for _ in bar:
        loss = lm_loss(model, *split_inputs_targets(next(stream)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def numerics() -> dict[str, object]:
    """What, besides the configs, decides the bits pretraining computes on this machine."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def cache_path(model_cfg: ModelConfig, data_cfg: TaskConfig, cfg: PretrainConfig,
               cache_dir: Path) -> Path:
    """The cache file of the base these configs pretrain to under this process's `numerics`."""
    key = json.dumps([asdict(model_cfg), asdict(data_cfg), asdict(cfg), numerics()],
                     sort_keys=True)
    return cache_dir / f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def load_or_pretrain(model_cfg: ModelConfig, data_cfg: TaskConfig, cfg: PretrainConfig,
                     cache_dir: Path | None = None,
                     progress: bool = True) -> tuple[Transformer, Path]:
    """The cached base model for these configs, pretraining (and caching) it if absent or
    damaged."""
    cache_dir = Path(cache_dir or default_cache_dir())
    path = cache_path(model_cfg, data_cfg, cfg, cache_dir)
    model = Transformer(model_cfg)
    if path.exists():
        try:
            model.load_state_dict(read_sealed(path, CACHE_MAGIC, "base-model cache"))
            return model.eval(), path
        except (ValueError, RuntimeError) as err:  # damaged, or not this model's: rebuilt
            print(f"{err}; pretraining the base model again", file=sys.stderr)
    try:  # prove the cache writable before pretraining, not after
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write the base-model cache in {str(cache_dir)!r} "
                         f"({err.strerror}): set FSLORA_CACHE to a writable folder") from None
    model = pretrain(model_cfg, data_cfg, cfg, progress)
    write_sealed(path, model.state_dict(), CACHE_MAGIC)
    return model, path
