"""Train all participants of a round at once: the batched engine (a simulation speed-up).

The sequential engine trains the round's P participants one after another (fslora_min/client.py):
P H small forward/backward passes, each re-reading the frozen base. The batched engine trains
them together, in H passes over all P clients' minibatches stacked into one (P b, t) batch:

- the frozen base W0 runs once over every client's tokens (one large GEMM per layer);
- each LoRA layer adds client p's own s (r/k_p) b_p a_p to client p's rows, with the clients'
  compact factors stacked into (P, m, K) and (P, K, n), zero-padded to K = max_p k_p, in two
  batched matmuls (the "batched" mode of fslora_min/lora.py; kernels/batched_lora.py);
- the loss is the SUM over clients of each client's mean loss, so client p's factors get
  exactly the gradient of its own loss (the other clients' rows do not depend on them);
- one optimizer steps the stacked factors. SGD and AdamW are elementwise, so this is P
  independent optimizers; a padded rank has coefficient 0, hence gradient 0, hence never moves.

Each client still draws its own minibatches from its own stream and starts from its own
downlink, so both engines give the same updates to float rounding (tests/test_engine.py). The
clients' sequences must all have one shape (true for `minibatches` over equal-sized client
sets). The model's dropout draws each client's masks from that client's own generator
(fslora_min/model.py `Dropout`), so the two engines also train on the same masks.

On a CPU the batched engine trains the round in passes of as many clients as keep the widest
activation (tokens x widest layer output) within CPU_PASS_BYTES. One pass of 16 default clients
makes (16384, 512) activations of 32 MiB, which glibc's malloc serves with fresh mmap'd pages
every time: the page faults made a GELU over them 4x slower per element than over a 4-client
pass's 8 MiB (measured: 4.4-5.3 GB/s against 21-27 GB/s). At 16 default clients, passes of 4,
8 and 16 clients measured 1.28x, 1.13x and 1.08x the sequential loop (results/engine/).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fslora_min.client import ClientConfig, ClientUpdate, LossFn, make_optimizer, train_client
from fslora_min.data import Minibatches, split_inputs_targets
from fslora_min.lora import (BatchedFactors, CompactFactors, LoRALinear, batched_compact_factors,
                             lora_modules)
from fslora_min.model import dropout_masks

ENGINES = ("auto", "sequential", "batched")
# What "auto" picks per device type, from results/engine/ (bench_engine.py): on an H100 batched
# is 6.4x (4 clients) to 21x (64) faster; on 2 CPU threads, in passes of 4, 1.64x / 1.22x / 1.17x
# at 4 / 16 / 64 clients.
FASTER_ENGINE = {"cpu": "batched", "cuda": "batched"}
CPU_PASS_BYTES = 8 * 2**20  # the widest activation of one CPU pass (the docstring says why)

Downlink = dict[str, CompactFactors]


def resolve_engine(engine: str, device: torch.device) -> str:
    """'sequential' or 'batched'; 'auto' is the one the benchmark measured faster on `device`."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return FASTER_ENGINE.get(device.type, "sequential") if engine == "auto" else engine


def default_clients_per_pass(model: nn.Module, batches: list[Minibatches]) -> int:
    """Clients per batched pass: all of them on a GPU; on a CPU, as many as keep the widest
    activation, (clients x rows x tokens, widest layer output), within CPU_PASS_BYTES."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not batches:
        return max(len(batches), 1)
    rows, tokens = batches[0].batch_shape
    widest = max(m.out_features for m in model.modules()
                 if isinstance(m, (nn.Linear, LoRALinear)))
    return max(1, CPU_PASS_BYTES // (rows * tokens * widest * weight.element_size()))


def stack_downlinks(downlinks: list[Downlink], scalings: dict[str, float],
                    device: torch.device) -> dict[str, BatchedFactors]:
    """Per module: the P clients' (b_p, a_p) zero-padded to K = max k_p and stacked, trainable.

    coef[p, :k_p] = s * diag(S_p) at client p's ranks (r / k_p, or its own per-index values),
    0 beyond: the forward of fslora_min/lora.py's compact mode, client by client.
    """
    out = {}
    for name in downlinks[0]:
        fs = [d[name] for d in downlinks]
        P, K = len(fs), max(f.sketch.k for f in fs)
        (m, _), (_, n) = fs[0].b.shape, fs[0].a.shape
        b = torch.zeros(P, m, K, dtype=fs[0].b.dtype, device=device)  # (P, m, K)
        a = torch.zeros(P, K, n, dtype=fs[0].a.dtype, device=device)  # (P, K, n)
        coef = torch.zeros(P, K, dtype=b.dtype, device=device)  # (P, K)
        for p, f in enumerate(fs):
            k, w = f.sketch.k, f.sketch.per_index
            b[p, :, :k], a[p, :k] = f.b, f.a
            coef[p, :k] = scalings[name] * (f.sketch.scale if w is None else w.to(coef))
        out[name] = BatchedFactors(b.requires_grad_(True), a.requires_grad_(True), coef)
    return out


def client_losses(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(P, b, L + 1) sequences of P clients -> (P,) each client's mean next-token loss."""
    P = batch.shape[0]
    inputs, targets = split_inputs_targets(batch.flatten(0, 1))  # (P b, L) each
    logits = model(inputs)  # (P b, L, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return loss.view(P, -1).mean(1)  # (P,)


def train_clients_batched(model: nn.Module, client_ids: list[int], downlinks: list[Downlink],
                          batches: list[Minibatches], cfg: ClientConfig,
                          num_examples: list[int],
                          masks: list[torch.Generator] | None = None) -> list[ClientUpdate]:
    """H local steps of all P clients at once; the same ClientUpdates as `train_client` gives
    (with the same `masks`, one dropout-mask generator per client)."""
    if not downlinks:  # every participant dropped out
        return []
    device = next(model.parameters()).device
    scalings = {name: layer.scaling for name, layer in lora_modules(model)}
    factors = stack_downlinks(downlinks, scalings, device)
    params = [t for f in factors.values() for t in (f.b, f.a)]
    opt = make_optimizer(params, cfg)  # elementwise: P independent SGD or AdamW optimizers
    with batched_compact_factors(model, factors), dropout_masks(model, masks):
        for _ in range(cfg.local_steps):
            mine = [next(stream) for stream in batches]  # each client's own next minibatch
            if len({tuple(x.shape) for x in mine}) != 1:
                raise ValueError(f"the batched engine needs equal minibatch shapes, got "
                                 f"{sorted({tuple(x.shape) for x in mine})}: use the "
                                 f"sequential engine")
            loss = client_losses(model, torch.stack(mine).to(device)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    updates = []
    for p, (i, down) in enumerate(zip(client_ids, downlinks)):
        deltas, numbers = {}, 0
        for name, f in down.items():
            k = f.sketch.k
            db = factors[name].b.detach()[p, :, :k] - f.b.to(device)  # (m, k)
            da = factors[name].a.detach()[p, :k] - f.a.to(device)  # (k, n)
            deltas[name], numbers = (db, da), numbers + db.numel() + da.numel()
        updates.append(ClientUpdate(i, {n: f.sketch for n, f in down.items()}, deltas,
                                    num_examples[p], numbers))
    return updates


def train_clients(engine: str, model: nn.Module, client_ids: list[int],
                  downlinks: list[Downlink], batches: list[Minibatches],
                  loss_fn: LossFn, cfg: ClientConfig, num_examples: list[int],
                  clients_per_pass: int = 0,
                  masks: list[torch.Generator] | None = None) -> list[ClientUpdate]:
    """The round's local training with either engine ('sequential': one client at a time).

    `loss_fn` is the sequential engine's per-minibatch loss; the batched engine uses the same
    mean next-token loss per client (`client_losses`), `clients_per_pass` clients at a time
    (0: `default_clients_per_pass`). `masks` holds each client's dropout-mask generator (None:
    torch's global one). Every client draws from its own streams, so passes change no number
    beyond float rounding.
    """
    if engine == "batched":
        step = clients_per_pass or default_clients_per_pass(model, batches)
        return [u for s in range(0, len(client_ids), step)
                for u in train_clients_batched(model, client_ids[s:s + step],
                                               downlinks[s:s + step], batches[s:s + step], cfg,
                                               num_examples[s:s + step],
                                               None if masks is None else masks[s:s + step])]
    if engine != "sequential":
        raise ValueError(f"engine must be 'sequential' or 'batched', got {engine!r}")
    gens = [None] * len(client_ids) if masks is None else masks
    return [train_client(model, i, down, stream, loss_fn, cfg, n, g)
            for i, down, stream, n, g in zip(client_ids, downlinks, batches, num_examples, gens)]
