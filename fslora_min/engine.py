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
  Clients with learning rates of their own (ClientConfig.lr_scaling) get them by
  `scale_client_steps`.

Each client still draws its own minibatches from its own stream and starts from its own
downlink, so both engines give the same updates to float rounding (tests/test_engine.py). The
clients' sequences must all have one shape (true for `minibatches` over equal-sized client
sets). The model's dropout draws each client's masks from that client's own generator
(fslora_min/model.py `Dropout`), so the two engines also train on the same masks.

On a CPU the batched engine trains the round in passes of as many clients as keep the widest
activation (tokens x widest layer output) within CPU_PASS_BYTES: larger activations are served
from fresh pages every time and run slower per element (results/engine/README.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from fslora_min.client import (ClientConfig, ClientUpdate, Downlink, dropout_masks, lr_ratio,
                               make_optimizer, train_client, upload)
from fslora_min.compute import CPU_PASS_BYTES
from fslora_min.data import Minibatches, split_inputs_targets
from fslora_min.lora import (BatchedFactors, CompactFactors, LoRALinear, batched_compact_factors,
                             lora_modules)
from fslora_min.model import lm_loss

# What "auto" picks per device type: the engine bench_engine.py measured faster there
# (results/engine/README.md).
FASTER_ENGINE = {"cpu": "batched", "cuda": "batched"}


def resolve_engine(engine: str, device: torch.device) -> str:
    """'sequential' or 'batched'; 'auto' is the one the benchmark measured faster on `device`."""
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


def stack_downlinks(downlinks: list[Downlink], scales: dict[str, float],
                    device: torch.device) -> dict[str, BatchedFactors]:
    """Per module: the P clients' (b_p, a_p) zero-padded to K = max k_p and stacked, trainable
    (each factor unless the clients' downlinks freeze it).

    client_scale[p, :k_p] = s * diag(S_p) at client p's ranks (r / k_p, or its own per-index
    values), 0 beyond: the forward of fslora_min/lora.py's compact mode, client by client. The
    clients' frozen folds (if any) are stacked the same way, never trainable.
    """
    out = {}
    for name in downlinks[0]:
        fs = [d[name] for d in downlinks]
        out[name] = stack_client_factors(fs, scales[name], device)
        for factor in ("b", "a"):  # one optimizer over the stack: one choice for all clients
            trains = {getattr(f, f"train_{factor}") for f in fs}
            if len(trains) > 1:
                raise ValueError(f"module {name}: some clients train {factor} and some do not; "
                                 f"the batched engine needs one choice per pass")
            getattr(out[name], factor).requires_grad_(trains.pop())
        folds = [f.fold for f in fs]
        if any(f is not None for f in folds):
            out[name].fold = stack_client_factors(folds, scales[name], device)  # frozen
    return out


def stack_client_factors(fs: list[CompactFactors | None], scale: float,
                         device: torch.device) -> BatchedFactors:
    """(P, m, K), (P, K, n) and client_scale (P, K) of P clients' factors (None: rank 0).

    One gather per factor: the clients' b (a) side by side with one zero column (row) after
    them, read at each client's slots, its k_p columns then the zero one up to K."""
    given = [f for f in fs if f is not None]
    ks = np.array([0 if f is None else f.sketch.k for f in fs])  # (P,)
    P, K = len(fs), int(ks.max())
    ends = np.cumsum(ks)
    slot = np.arange(K)[None, :]  # (1, K)
    columns = np.where(slot < ks[:, None], ends[:, None] - ks[:, None] + slot, ends[-1])  # (P, K)
    at = torch.from_numpy(columns.reshape(-1)).to(device)
    b0, a0 = given[0].b, given[0].a
    b = torch.cat([f.b.to(device) for f in given] + [b0.new_zeros(b0.shape[0], 1, device=device)],
                  1).index_select(1, at)  # (m, P K)
    a = torch.cat([f.a.to(device) for f in given] + [a0.new_zeros(1, a0.shape[1], device=device)],
                  0).index_select(0, at)  # (P K, n)
    weights = np.zeros((P, K))  # s * diag(S_p) at client p's ranks, 0 beyond
    for p, f in enumerate(fs):
        if f is not None:
            w = f.sketch.per_index
            weights[p, :f.sketch.k] = (scale * f.sketch.sketch_weight if w is None
                                       else (scale * w.to(b.dtype)).double().cpu().numpy())
    return BatchedFactors(b.view(b.shape[0], P, K).transpose(0, 1).contiguous(),
                          a.view(P, K, a.shape[1]),
                          torch.from_numpy(weights).to(device, b.dtype))


def scale_client_steps(params: list[torch.Tensor], before: list[torch.Tensor],
                       ratios: torch.Tensor) -> None:
    """x_p <- x_p^0 + rho_p (x_p - x_p^0) for each client p of the stacked factors (P, ...):
    client p's step at learning rate eta rho_p instead of eta.

    Exact for SGD and AdamW: given the optimizer's state (moments of the gradients, which never
    depend on the lr), their step, decoupled weight decay included, is linear in the lr.
    """
    with torch.no_grad():
        for x, x0 in zip(params, before):
            x.copy_(torch.lerp(x0, x, ratios.to(x).view(-1, *[1] * (x.dim() - 1))))


def train_clients_batched(model: nn.Module, client_ids: list[int], downlinks: list[Downlink],
                          batches: list[Minibatches], cfg: ClientConfig,
                          num_examples: list[int],
                          masks: list[torch.Generator] | None = None,
                          scored_from: int = 0) -> list[ClientUpdate]:
    """H local steps of all P clients at once (step 3 of a round, the default engine); the same
    ClientUpdates as `train_client`, the one-client reference, gives (with the same `masks`,
    one dropout-mask generator per client)."""
    if not downlinks:  # every participant dropped out
        return []
    device = next(model.parameters()).device
    scales = {name: layer.scale for name, layer in lora_modules(model)}
    factors = stack_downlinks(downlinks, scales, device)
    params = [t for f in factors.values() for t in (f.b, f.a) if t.requires_grad]
    opt = make_optimizer(params, cfg, cfg.lr)  # elementwise: P independent SGD or AdamW
    rhos = [lr_ratio(down, cfg.lr_scaling) for down in downlinks]  # client p's lr is eta rho_p
    own_lrs = any(rho != 1 for rho in rhos)
    ratios = torch.tensor(rhos, dtype=torch.float64) if own_lrs else None  # (P,)
    start = {name: (f.b.detach().clone(), f.a.detach().clone()) for name, f in factors.items()}
    with batched_compact_factors(model, factors), dropout_masks(model, masks):
        for _ in range(cfg.local_steps):
            mine = [next(stream) for stream in batches]  # each client's own next minibatch
            if len({tuple(x.shape) for x in mine}) != 1:
                raise ValueError(f"the batched engine needs equal minibatch shapes, got "
                                 f"{sorted({tuple(x.shape) for x in mine})}: use the "
                                 f"sequential engine")
            batch = torch.stack(mine).to(device)  # (P, b, L + 1)
            inputs, targets = split_inputs_targets(batch.flatten(0, 1))  # (P b, L) each
            loss = lm_loss(model, inputs, targets, len(mine), scored_from).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = [x.detach().clone() for x in params] if own_lrs else []
            opt.step()
            if own_lrs:
                scale_client_steps(params, before, ratios)
    moved = {name: (f.b.detach() - start[name][0], f.a.detach() - start[name][1])
             for name, f in factors.items()}  # (P, m, K), (P, K, n): every client's deltas
    return [upload(i, down, {name: (moved[name][0][p, :, :f.sketch.k],  # (m, k)
                                    moved[name][1][p, :f.sketch.k])  # (k, n)
                             for name, f in down.items()}, num_examples[p])
            for p, (i, down) in enumerate(zip(client_ids, downlinks))]


def train_clients(engine: str, model: nn.Module, client_ids: list[int],
                  downlinks: list[Downlink], batches: list[Minibatches], cfg: ClientConfig,
                  num_examples: list[int], clients_per_pass: int = 0,
                  masks: list[torch.Generator] | None = None,
                  scored_from: int = 0) -> list[ClientUpdate]:
    """The round's local training with either engine ('sequential': one client at a time);
    the loss counts target positions >= `scored_from` (`FederatedData.scored_from`).

    The batched engine trains `clients_per_pass` clients at a time (0:
    `default_clients_per_pass`), in the order of `client_ids`. `masks` holds each client's
    dropout-mask generator (None: torch's global one). Every client draws from its own streams,
    so passes change no number beyond float rounding. (Grouping the passes by k_i would pad less,
    but a pass's K sets its matmuls' shapes and so their float32 rounding: the demo's and the
    study's committed numbers would no longer replay.)
    """
    if engine == "batched":
        step = clients_per_pass or default_clients_per_pass(model, batches)
        return [u for s in range(0, len(client_ids), step)
                for u in train_clients_batched(model, client_ids[s:s + step],
                                               downlinks[s:s + step], batches[s:s + step], cfg,
                                               num_examples[s:s + step],
                                               None if masks is None else masks[s:s + step],
                                               scored_from)]
    if engine != "sequential":
        raise ValueError(f"engine must be 'sequential' or 'batched', got {engine!r}")
    gens = [None] * len(client_ids) if masks is None else masks
    return [train_client(model, i, down, stream, cfg, n, g, scored_from)
            for i, down, stream, n, g in zip(client_ids, downlinks, batches, num_examples, gens)]
