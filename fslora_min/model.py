"""A decoder-only transformer written from scratch, small enough to pretrain on a laptop CPU.

Token and position embeddings, pre-LayerNorm blocks (causal multi-head self-attention, GELU
MLP), a final LayerNorm and a linear LM head: GPT-2's layout (Radford et al. 2019), after
nanoGPT's model.py. The attention keeps q, k, v and out as four separate nn.Linear layers so
each can be given its own LoRA adapter (fslora_min/lora.py). Shapes: batch b, time t, width d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 64  # tokens of the synthetic task (fslora_min/data.py)
    context: int = 64  # longest sequence the position table covers
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128  # width; each head has d_model // n_head channels
    dropout: float = 0.0  # in pretraining and client training (each client's own masks there)
    bias: bool = True  # biases in the linear layers and LayerNorms

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


TEST_CONFIG = ModelConfig(vocab_size=16, context=8, n_layer=1, n_head=2, d_model=16)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        mask = torch.tril(torch.ones(cfg.context, cfg.context, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)  # (context, context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_head

        def heads(y: torch.Tensor) -> torch.Tensor:  # (b, t, d) -> (b, h, t, d/h)
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)  # (b, h, t, t)
        att = att.masked_fill(~self.causal_mask[:t, :t], float("-inf"))  # no peeking ahead
        att = self.dropout(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)  # (b, t, d): heads side by side
        return self.dropout(self.out(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (b, t, d)


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)): the pre-LayerNorm residual block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2's init
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (b, t) -> next-token logits (b, t, vocab_size)."""
        b, t = idx.shape
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.cfg.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.token_emb(idx) + self.pos_emb(pos))  # (b, t, d)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (b, t, vocab_size)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
            groups: int = 0, scored_from: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of (b, t) targets under the model's logits: the one loss of
    pretraining and of every client's local steps. Only target positions >= `scored_from` count
    (the model still reads every input: the earlier tokens are context).

    With `groups` = P, the b rows are P equal groups in order (a batched round's clients) and
    the result is the (P,) vector of each group's mean: its sum gives every group exactly the
    gradient of its own mean loss.
    """
    logits = model(inputs)  # (b, t, vocab)
    if scored_from:
        logits, targets = logits[:, scored_from:], targets[:, scored_from:]
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (b t, vocab)
    if not groups:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="none").view(groups, -1).mean(1)  # (P,)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
