"""A hand-written LoRA linear layer that can run on a sketch of its ranks (docs/method.md, 1).

    W = W0 + s * B @ A                      (plain LoRA, all r ranks; s = alpha/r or alpha/sqrt(r))
    W = W0 + s * (r/k) * B[:, I] @ A[I, :]  (with a sketch: W0 + s * B S A)

`lora_B` (m x r) starts at zero and `lora_A` (r x n) random, so at init the layer equals its
base. Its forward is plain LoRA, W0 + s B A (the server's model: evaluation, inference), unless
a context manager sets one of three other modes (never train()/eval()), each a small object
with its own forward:
- `Sketched`: W0 + s B S A on the global factors; gradients reach only the ranks in I;
- `CompactFactors`: W0 + s (r/k) b a with client-owned factors b = B[:, I] (m x k),
  a = A[I, :] (k x n): what a client trains, so its trainable state scales with k, never r;
- `BatchedFactors`: P clients' compact factors at once (fslora_min/engine.py): the input holds
  the clients' tokens side by side, W0 runs once over all of them, and client p's rows get
  s (r/k_p) b_p a_p (kernels/batched_lora.py).
Modules are found by type (`lora_modules`), never by matching parameter names.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fslora_min.knobs import ConfigError, check_knobs, knob
from fslora_min.sketch import Sketch, check_rank_pair
from kernels import lora_linear
from kernels.batched_lora import batched_lora_linear

# Which projections of the transformer to adapt: names of nn.Linear attributes inside a block.
ALL_TARGETS = ("q", "k", "v", "out", "fc", "proj")


@dataclass
class LoRAConfig:
    rank: int = knob(16, "global LoRA rank r, held by the server", check="positive integer")
    alpha: float = knob(32.0, "LoRA alpha: scale s = alpha / r", flag="--lora-alpha",
                        check="positive")
    rslora: bool = knob(False, "use s = alpha / sqrt(r) (rsLoRA)")
    targets: tuple[str, ...] = knob(ALL_TARGETS, "projections to adapt in every block",
                                    choices=ALL_TARGETS)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        check_knobs(self)
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(self, "targets", f"must not repeat a name, got {self.targets}")


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r (LoRA) or s = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    check_rank_pair(r, 1)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora alpha must be a positive finite number, got alpha={alpha!r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """Drop-in for nn.Linear: frozen W0 (m x n) and bias, LoRA factors B (m x r), A (r x n).

    `backend` and `gemm` pick the kernel of the global, sketched and compact modes
    (kernels/dispatch.py: 'auto' runs Triton on CUDA tensors, the PyTorch reference elsewhere);
    the batched mode always runs kernels/batched_lora.py.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False,
                 backend: str = "auto", generator: torch.Generator | None = None,
                 gemm: str = "pointer") -> None:
        super().__init__()
        self.scale = lora_scale(alpha, r, rslora)  # s; checks r and alpha
        m, n = base.out_features, base.in_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)  # (m, n)
        self.bias = (None if base.bias is None
                     else nn.Parameter(base.bias.detach().clone(), requires_grad=False))  # (m,)
        # A as nn.Linear inits its weight (drawn on the CPU, so one seed gives one A on any
        # device); B = 0, so B A = 0 and the layer starts equal to its base
        A = torch.empty(r, n, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A.to(base.weight.device))  # (r, n)
        self.lora_B = nn.Parameter(torch.zeros(m, r, dtype=A.dtype,
                                               device=base.weight.device))  # (m, r)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.backend, self.gemm = backend, gemm
        self.mode: Mode | None = None  # set by `sketched`, `compact_factors`, `batched_...`
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, the (m, n) update LoRA adds to W0."""
        return self.scale * self.lora_B @ self.lora_A

    def merge(self) -> None:
        """W0 <- W0 + s B A, so the forward is one plain matmul (inference only)."""
        if self.merged:
            raise RuntimeError("merge() called on a layer that is already merged")
        with torch.no_grad():
            self.weight += self.delta_weight()
        self.merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - s B A: undoes merge() (up to rounding in the weight's dtype)."""
        if not self.merged:
            raise RuntimeError("unmerge() called on a layer that is not merged")
        with torch.no_grad():
            self.weight -= self.delta_weight()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., n) -> (..., m)
        if self.merged:  # W0 already holds s B A
            return F.linear(x, self.weight, self.bias)
        if self.mode is None:  # plain LoRA: W0 x + s B A x
            return lora_linear(x, self.weight, self.bias, self.lora_B, self.lora_A, None,
                               self.scale, self.backend, gemm=self.gemm)
        return self.mode.forward(self, x)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:.4g}, rslora={self.rslora}, backend={self.backend}, "
                f"gemm={self.gemm}")


@dataclass
class Sketched:
    """W0 + s (r/k) B[:, I] A[I, :] on the global factors (one sketch S of the r ranks)."""

    sketch: Sketch

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        index = self.sketch.indices.to(x.device)
        B, client_scale = _weighted(layer.lora_B, self.sketch, index, layer.scale)  # (m, r)
        # Sketch checked its index when it was made: no range check (a device sync) here
        return lora_linear(x, layer.weight, layer.bias, B, layer.lora_A, index, client_scale,
                           layer.backend, check_index=False, gemm=layer.gemm)


@dataclass
class CompactFactors:
    """A client's trainable factors for one module: b = B[:, I], a = A[I, :], and its sketch.

    `fold`, when given, is a FROZEN low-rank term beside the trained ranks (Fed-PLoRA's
    Select-N-Fold, fslora_min/rivals.py: the ranks a client does not train), at the same
    diagonal value: the forward is W0 + c [b, b_f] [a; a_f], computed factored, never formed as
    m x n. `train_b` / `train_a` say which factors the client trains (FFA-LoRA freezes a;
    RoLoRA alternates); a frozen factor's delta is exactly zero and is not uploaded.
    """

    b: torch.Tensor  # (m, k)
    a: torch.Tensor  # (k, n)
    sketch: Sketch
    fold: CompactFactors | None = None  # frozen: b (m, f), a (f, n), the same diagonal value
    train_b: bool = True
    train_a: bool = True

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """W0 x + s (r/k) b a x (+ the fold's ranks, in the same product)."""
        b, client_scale = _weighted(self.b, self.sketch, None, layer.scale)  # (m, k)
        a = self.a  # (k, n)
        if self.fold is not None:  # the same diagonal value (`compact_factors` checks)
            b, a = torch.cat([b, self.fold.b], 1), torch.cat([a, self.fold.a], 0)  # (m, k + f)
        return lora_linear(x, layer.weight, layer.bias, b, a, None, client_scale, layer.backend,
                           gemm=layer.gemm)


@dataclass
class BatchedFactors:
    """P clients' factors for one module, zero-padded to K = max_p k_p (kernels/batched_lora.py)."""

    b: torch.Tensor  # (P, m, K)
    a: torch.Tensor  # (P, K, n)
    client_scale: torch.Tensor  # (P, K): s * diag(S_p) at client p's k_p ranks, 0 beyond
    fold: BatchedFactors | None = None  # the clients' frozen folds (CompactFactors.fold), padded

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """Client p's rows: W0 x + s (r/k_p) b_p a_p x (+ its fold's ranks beside them)."""
        b, a, client_scale = self.b, self.a, self.client_scale
        if self.fold is not None:  # frozen ranks beside the trained ones (no gradient reaches)
            b, a = torch.cat([b, self.fold.b], 2), torch.cat([a, self.fold.a], 1)
            client_scale = torch.cat([client_scale, self.fold.client_scale], 1)  # (P, K + F)
        xs = x.reshape(self.b.shape[0], -1, x.shape[-1])  # (P, T, n): clients in batch order
        y = batched_lora_linear(xs, layer.weight, layer.bias, b, a, client_scale)  # (P, T, m)
        return y.reshape(*x.shape[:-1], y.shape[-1])


Mode = Sketched | CompactFactors | BatchedFactors


def _weighted(b: torch.Tensor, sketch: Sketch, index: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, float]:
    """(b', c) with c b' = s b diag(w), w the sketch's diagonal values: (b, s w) when they are
    one number, (b diag(w), s) when they are one per index.

    `b` is compact (m, k) when `index` is None, else the global (m, r) whose columns `index` the
    kernel selects. Multiplying b by w (not its gradient) gives b the exact gradient of
    W0 + s b diag(w) a.
    """
    w = sketch.per_index
    if w is None:
        return b, scale * sketch.sketch_weight
    if index is None:
        return b * w.to(b)[None, :], scale  # (m, k)
    full = torch.ones(b.shape[1], dtype=b.dtype, device=b.device)  # (r,)
    full[index] = w.to(b)
    return b * full[None, :], scale  # (m, r); only the columns at index are used


def apply_lora(model: nn.Module, r: int, alpha: float, targets: tuple[str, ...] = ALL_TARGETS,
               rslora: bool = False, backend: str = "auto",
               generator: torch.Generator | None = None, gemm: str = "pointer") -> list[str]:
    """Replace each nn.Linear whose attribute name is in `targets` by a LoRALinear; freeze the rest.

    Returns the qualified names of the new LoRA modules, in model order. Raises if a target names
    no layer at all, so a typo can never leave the model silently un-adapted.
    """
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {ALL_TARGETS}, "
                         f"got {tuple(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = adapted_layers(model, targets)
    if not layers:
        raise ValueError(f"no nn.Linear named one of {targets} found: nothing was adapted")
    for name, layer in layers.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr,
                LoRALinear(layer, r, alpha, rslora, backend, generator, gemm))
    return [name for name, _ in lora_modules(model)]


def adapted_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The nn.Linear layers LoRA adapts (those whose attribute name is in `targets`), by
    qualified name in model order: the one walk `apply_lora` and the shape checks share."""
    return {f"{parent_name}.{name}" if parent_name else name: m
            for parent_name, parent in model.named_modules()
            for name, m in parent.named_children()
            if name in targets and type(m) is nn.Linear}


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """All LoRA layers of a model with their qualified names, found by type."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def _mode(model: nn.Module, given: dict[str, Mode],
          check: Callable[[str, LoRALinear, Any], None]) -> Iterator[None]:
    """Run every LoRA layer in its mode from `given` (after `check`); plain LoRA again on exit."""
    modules = dict(lora_modules(model))
    _check_names(modules, given)
    try:
        for name, mode in given.items():
            if modules[name].merged:
                raise RuntimeError("a merged LoRA layer cannot run sketched: unmerge() first")
            check(name, modules[name], mode)
            modules[name].mode = mode
        yield
    finally:
        for m in modules.values():
            m.mode = None


def sketched(model: nn.Module, sketches: dict[str, Sketch]) -> AbstractContextManager[None]:
    """Run the model's LoRA layers on the global factors with W0 + s B S A (one S per module)."""
    def check(name: str, layer: LoRALinear, mode: Sketched) -> None:
        if mode.sketch.rank != layer.r:
            raise ValueError(f"sketch for {name} is over rank {mode.sketch.rank}, "
                             f"but the layer has r={layer.r}")
    return _mode(model, {name: Sketched(sk) for name, sk in sketches.items()}, check)


def compact_factors(model: nn.Module,
                    factors: dict[str, CompactFactors]) -> AbstractContextManager[None]:
    """Run the model's LoRA layers on client-owned compact factors: W0 + s (r/k) b a."""
    def check(name: str, layer: LoRALinear, f: CompactFactors) -> None:
        k = f.sketch.k
        if f.b.shape != (layer.out_features, k) or f.a.shape != (k, layer.in_features):
            raise ValueError(f"compact factors for {name} have shapes {tuple(f.b.shape)} and "
                             f"{tuple(f.a.shape)}, expected ({layer.out_features}, {k}) and "
                             f"({k}, {layer.in_features})")
        if f.fold is not None and not same_diagonal(f.sketch, f.fold.sketch):
            raise ValueError(f"the fold of {name} must share its trained ranks' one diagonal "
                             f"value")
    return _mode(model, factors, check)


def batched_compact_factors(model: nn.Module,
                            factors: dict[str, BatchedFactors]) -> AbstractContextManager[None]:
    """Run the model's LoRA layers on P clients' padded factors at once (the batched mode).

    The model's input must then hold the P clients' sequences in client order, equally many each.
    """
    def check(name: str, layer: LoRALinear, f: BatchedFactors) -> None:
        P, K = f.client_scale.shape
        if (f.b.shape != (P, layer.out_features, K) or f.a.shape != (P, K, layer.in_features)):
            raise ValueError(f"batched factors for {name} have shapes {tuple(f.b.shape)} and "
                             f"{tuple(f.a.shape)}, expected ({P}, {layer.out_features}, {K}) and "
                             f"({P}, {K}, {layer.in_features})")
    return _mode(model, factors, check)


def same_diagonal(a: Sketch, b: Sketch) -> bool:
    """Both sketches put one and the same value on their diagonal."""
    return a.per_index is None and b.per_index is None and a.sketch_weight == b.sketch_weight


def _check_names(modules: dict[str, LoRALinear], given: dict) -> None:
    if set(given) != set(modules):
        missing, extra = sorted(set(modules) - set(given)), sorted(set(given) - set(modules))
        raise ValueError(f"per-module inputs must name every LoRA module exactly: "
                         f"missing {missing}, unknown {extra}")


def global_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (B, A)} views of the global factors (m x r, r x n)."""
    return {name: (m.lora_B, m.lora_A) for name, m in lora_modules(model)}


def count_lora_parameters(model: nn.Module) -> int:
    """Number of global LoRA numbers: sum over modules of r (m + n)."""
    return sum(m.lora_B.numel() + m.lora_A.numel() for _, m in lora_modules(model))
