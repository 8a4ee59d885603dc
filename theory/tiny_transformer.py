"""The tiny transformer as a function of its flat LoRA factors X, for smoothness measurements.

The library's model (fslora_min/model.py) with LoRA on every projection (fslora_min/lora.py),
in float32 (the library's LoRA kernels accept float32, bfloat16 and float16 only; the
power-iteration checks allow for its rounding), on seeded synthetic token data: each sequence counts up by a fixed step from a random
start, so there is something to learn. The three losses of docs/method.md section 6:

    f(X)       = lm_loss with W = W0 + s B A in every adapted layer
    f~(X; S)   = lm_loss with W0 + s B S A (the library's `sketched` context: one S per module)
    f(P_S X)   = f at the projected factors (B S^1/2, S^1/2 A): equal to f~(X; S)

X enters through torch.func.functional_call, so autograd gives Hessian-vector products in X.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from fslora_min.lora import apply_lora, global_factors, sketched
from fslora_min.model import ModelConfig, Transformer, lm_loss
from fslora_min.sketch import Sketch, sample_module_sketches


@dataclass
class TinyConfig:
    vocab_size: int = 16
    context: int = 8
    n_layer: int = 1
    n_head: int = 2
    d_model: int = 8
    r: int = 8  # global LoRA rank
    alpha: float = 8.0
    batch: int = 8  # sequences in the (fixed) batch the loss is measured on
    count_step: int = 3  # each sequence is start, start + step, ... (mod vocab)
    seed: int = 0


class TinyLoRAProblem:
    def __init__(self, cfg: TinyConfig) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # the model's init uses the global generator
        mc = ModelConfig(cfg.vocab_size, cfg.context, cfg.n_layer, cfg.n_head, cfg.d_model)
        self.model = Transformer(mc)
        self.names = apply_lora(self.model, cfg.r, cfg.alpha)
        self.model.float().eval()
        g = torch.Generator().manual_seed(cfg.seed)
        start = torch.randint(cfg.vocab_size, (cfg.batch, 1), generator=g)
        seq = (start + cfg.count_step * torch.arange(cfg.context + 1)) % cfg.vocab_size
        self.inputs, self.targets = seq[:, :-1], seq[:, 1:]  # (b, t) each
        factors = global_factors(self.model)
        self.shapes = [(factors[nm][0].shape, factors[nm][1].shape) for nm in self.names]
        self.x0 = torch.cat([t.detach().reshape(-1) for nm in self.names for t in factors[nm]])

    def params(self, x: torch.Tensor) -> dict:
        """{qualified parameter name: tensor}: the (m, r) B and (r, n) A of each module, from X."""
        out, i = {}, 0
        for nm, (sb, sa) in zip(self.names, self.shapes):
            out[f"{nm}.lora_B"] = x[i: i + sb.numel()].view(sb)  # (m, r)
            i += sb.numel()
            out[f"{nm}.lora_A"] = x[i: i + sa.numel()].view(sa)  # (r, n)
            i += sa.numel()
        return out

    def project(self, x: torch.Tensor, sketches: dict[str, Sketch]) -> torch.Tensor:
        """P_S X: (B S^1/2, S^1/2 A) in every module, as a flat vector like X."""
        parts, p = [], self.params(x)
        for nm in self.names:
            h = sketches[nm].diagonal().to(x.dtype).sqrt()  # (r,)
            B, A = p[f"{nm}.lora_B"], p[f"{nm}.lora_A"]  # (m, r), (r, n)
            parts += [(B * h).reshape(-1), (h[:, None] * A).reshape(-1)]
        return torch.cat(parts)

    def loss(self, x: torch.Tensor, sketches: dict[str, Sketch] | None = None) -> torch.Tensor:
        """f(X), or f~(X; S) when sketches (one per module) are given."""
        call = _Call(self.model, self.params(x))
        if sketches is None:
            return lm_loss(call, self.inputs, self.targets)
        with sketched(self.model, sketches):
            return lm_loss(call, self.inputs, self.targets)

    def sample(self, k: int, g: torch.Generator) -> dict[str, Sketch]:
        """One independent k-sketch per adapted module (docs/method.md section 3, step 2)."""
        return sample_module_sketches(self.names, self.cfg.r, k, g)


class _Call:
    """model(inputs) with the LoRA factors replaced by the given tensors (functional_call)."""

    def __init__(self, model: torch.nn.Module, params: dict) -> None:
        self.model, self.params = model, params

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params, (idx,))
