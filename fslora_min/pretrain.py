"""Pretrain the base model on the task's pretraining corpus, or reuse a cached copy.

The cache file is keyed by everything that determines the weights (model and data configs,
steps, batch size, learning rate, seed), stores a plain state dict and loads it with
`torch.load(..., weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fslora_min.knobs import check_knobs, knob
from fslora_min.data import split_inputs_targets
from fslora_min.model import ModelConfig, Transformer, lm_loss
from fslora_min.tasks import TaskConfig, pretraining_stream


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


def load_failure(err: Exception) -> str:
    """Why `torch.load(..., weights_only=True)` refused a file, in one line.

    PyTorch's own message for a file that holds more than tensors suggests retrying with
    weights_only=False, which would run whatever code the file carries: never repeat that.
    """
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
        return ("not plain tensors and numbers" + (f" ({detail.group(1)})" if detail else ""))
    return text.splitlines()[0] if text else type(err).__name__


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


def load_or_pretrain(model_cfg: ModelConfig, data_cfg: TaskConfig, cfg: PretrainConfig,
                     cache_dir: Path | None = None,
                     progress: bool = True) -> tuple[Transformer, Path]:
    """The cached base model for these configs, pretraining (and caching) it if absent."""
    key = json.dumps([asdict(model_cfg), asdict(data_cfg), asdict(cfg)], sort_keys=True)
    cache_dir = Path(cache_dir or default_cache_dir())
    path = cache_dir / f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    model = Transformer(model_cfg)
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), path
        except Exception as err:  # a damaged cache file is rebuilt, not trusted
            print(f"cached base model {path} is unreadable ({load_failure(err)}); "
                  f"pretraining again")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes pretraining at once never clash
    try:  # prove the cache writable before pretraining, not after
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"")
        tmp.unlink()
    except OSError as err:
        raise ValueError(f"cannot write the base-model cache in {str(cache_dir)!r} "
                         f"({err.strerror}): set FSLORA_CACHE to a writable folder") from None
    model = pretrain(model_cfg, data_cfg, cfg, progress)
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache file
    return model, path
