# %% [markdown]
# # 3. A tiny federation, round by round
#
# FSLoRA's round (docs/method.md section 3): the server samples participants; for each participant
# and each LoRA module it draws an index set `I` of size `k_i` and sends `B[:, I]` and `A[I, :]`;
# the client trains those compact factors for `H` local steps and sends back their deltas; the
# server zero-pads the deltas to rank `r` and averages them over the participants.
#
# We build a small federation from the library's parts: 6 clients with the paper's sketching
# ratios {1/8, 1/4, 1/2, 3/4} (so `k_i` of 1, 2, 4, 6 out of `r = 8`), 4 of them taking part each
# round, on non-IID data. We play the first round by hand with the library's functions to see
# who trains what and what moves over the wire, then let `Federation.run_round` play the rest,
# and end with a heatmap of how often each rank index of each module was trained.
#
# Setup: repository root, seed, one thread.

# %%
import os
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "fslora_min").is_dir())
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
FAST = os.environ.get("FSLORA_FAST") == "1"
SEED = 0

import copy

import matplotlib.pyplot as plt
import numpy as np
import torch

from fslora_min.ranks import PAPER_RATIOS, ranks_from_ratios
from fslora_min.client import ClientConfig, train_client
from fslora_min.data import DataConfig, make_federated_data
from fslora_min.federation import Federation, FederationConfig, evaluate
from fslora_min.lora import LoRAConfig, apply_lora, count_lora_parameters
from fslora_min.methods import payload_numbers
from fslora_min.model import ModelConfig
from fslora_min.pretrain import PretrainConfig, load_or_pretrain
from fslora_min.rng import LORA_INIT, generator
from fslora_min.server import Server, ServerConfig, sample_participants

torch.set_num_threads(1)  # tiny model: more threads only contend for a shared CPU
print(f"seed {SEED}, device cpu, torch {torch.__version__}, threads 1, fast mode {FAST}")

# %% [markdown]
# ## The pieces
#
# A 2-layer, width-32 transformer pretrained on a synthetic "topic Markov" language (cached in
# `.cache/` after the first run, a few seconds), then fine-tuned on *shifted* topics. Each
# client's data mixes the topics with Dirichlet(0.5) proportions: most clients see mostly one or
# two topics (non-IID). LoRA of global rank `r = 8` goes on all 12 linear layers (q, k, v, out,
# fc, proj in each block).

# %%
model_cfg = ModelConfig(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=32)
data_cfg = DataConfig(vocab_size=32, seq_len=16, n_base_topics=4, successors=2, train_seqs=32,
                      heldout_seqs=8, global_heldout_seqs=64, seed=SEED)
fed_cfg = FederationConfig(num_clients=6, participants=4, rounds=3 if FAST else 30, seed=SEED)
lora_cfg = LoRAConfig(rank=8, alpha=16.0)
client_cfg = ClientConfig(local_steps=5, lr=0.3, batch_size=8)
ranks = ranks_from_ratios(list(PAPER_RATIOS), fed_cfg.num_clients, lora_cfg.rank)

base, cache = load_or_pretrain(model_cfg, data_cfg, PretrainConfig(steps=300, batch_size=32,
                                                                   lr=1e-2), progress=False)
data = make_federated_data(data_cfg, fed_cfg.num_clients)
model = copy.deepcopy(base)
names = apply_lora(model, lora_cfg.rank, lora_cfg.alpha, generator=generator(SEED, LORA_INIT))
server = Server(model, ServerConfig())
fed = Federation(server, data, ranks, fed_cfg, client_cfg)  # no method given: FSLoRA
print(f"base model from {cache.name}; {len(names)} LoRA modules, "
      f"{count_lora_parameters(model):,} global LoRA numbers (r = {lora_cfg.rank})")
print("client ranks k_i:", ranks, " ratios k_i/r:", [k / lora_cfg.rank for k in ranks])

fig, ax = plt.subplots(figsize=(5, 2.6))
im = ax.imshow(torch.stack([c.topic_mix for c in data.clients]), cmap="Greens", vmin=0, vmax=1)
ax.set(xlabel="topic", ylabel="client", title="each client's topic mix (Dirichlet 0.5)")
fig.colorbar(im, ax=ax);

# %% [markdown]
# ## Round 1, step by step
#
# We use the federation's own random streams, so this hand-played round is exactly the one
# `Federation.run_round(1)` would have played. For one module (`blocks.0.attn.q`, m = n = 32) we
# print each participant's index set; for all 12 modules the numbers each one receives and
# sends, `k_i * sum(m + n)`, and the bytes at fp32.

# %%
loss0, acc0 = evaluate(server.model, data.global_heldout)  # B = 0: the pretrained model
print(f"global held-out loss before round 1: {loss0:.4f} (accuracy {acc0:.3f})")
watch = "blocks.0.attn.q"
B_before = server.modules[watch].lora_B.detach().clone()
participants = sample_participants(fed_cfg.num_clients, fed_cfg.participants,
                                   fed.participant_stream)
print(f"participants P_1 = {participants}")
updates, downlinks = [], []
for i in participants:
    sketches = fed.method.sketches(server, ranks[i], fed.sketch_stream)  # one I per module
    downlink = fed.method.downlink(server, sketches)  # b = B[:, I], a = A[I, :]
    update = train_client(server.model, i, downlink, fed.batch_streams[i],
                          client_cfg, len(data.clients[i].train))
    numbers = payload_numbers(downlink)
    up = sum(db.numel() + da.numel() for db, da in update.deltas.values())
    f = downlink[watch]
    print(f"client {i}: k={ranks[i]}  I({watch}) = {sketches[watch].indices.tolist()}  "
          f"b {tuple(f.b.shape)} a {tuple(f.a.shape)}  trains {update.trainable_parameters:,}  "
          f"down {numbers:,} / up {up:,} numbers = {4 * up / 1024:.1f} KiB each way")
    updates.append(update)
    downlinks.append(downlink)
fed.method.aggregate(server, updates, downlinks)  # zero-pad, average over P_1, X <- X + D

moved = torch.nonzero((server.modules[watch].lora_B.detach() - B_before).abs().sum(0))
drawn = sorted({j for u in updates for j in u.sketches[watch].indices.tolist()})
print(f"\n{watch}: ranks drawn by someone {drawn}; columns of B that moved {moved.flatten().tolist()}")
print("ranks nobody drew stay exactly where they were:",
      sorted(set(range(lora_cfg.rank)) - set(drawn)))
loss, acc = evaluate(server.model, data.global_heldout)
print(f"global held-out loss after round 1: {loss:.4f} (accuracy {acc:.3f})")

# %% [markdown]
# ## The remaining rounds
#
# `Federation.run_round(t)` does the same steps and returns a `RoundRecord`: the participants,
# their `k_i`, the numbers and bytes each moved, the wall time, and the global held-out loss.
# Per round, a participant moves `k_i / r` of what a full-rank client would.

# %%
records = [fed.run_round(t) for t in range(2, fed_cfg.rounds + 1)]
print(f"{'round':>5} {'participants':>14} {'k_i':>12} {'KiB up per participant':>28} {'loss':>7}")
for rec in records[:5] + records[-2:]:
    kib = " ".join(f"{b / 1024:.1f}" for b in rec.bytes_up)
    print(f"{rec.round:5d} {str(rec.participants):>14} {str(rec.client_ranks):>12} {kib:>28} "
          f"{rec.heldout_loss:7.4f}")
full = 4 * lora_cfg.rank * sum(m + n for m, n in server.shapes.values()) / 1024
print(f"(a full-rank client, k = r = {lora_cfg.rank}, would move {full:.1f} KiB each way)")

# %% [markdown]
# ## Bytes per client and rank coverage
#
# Left: the held-out loss of the global model. Middle: the total bytes each client uploaded
# over the run: the product of how often it was sampled and its `k_i`. Right: the server's count
# of how often each rank index `j` of each module was trained. With uniform index sets every
# index is trained about equally often, `sum over rounds of sum_{i in P_t} k_i / r` times: every
# rank of the global LoRA learns, even though no small client ever holds more than one or two
# of them at once. (HetLoRA, which always gives a client the *first* `k_i` ranks, leaves the high
# indices to the big clients; notebook 4 shows its heatmap.)

# %%
up_per_client = np.zeros(fed_cfg.num_clients)
for u in updates:  # round 1, played by hand above
    up_per_client[u.client_id] += 4 * sum(db.numel() + da.numel() for db, da in u.deltas.values())
for rec in records:
    for i, b in zip(rec.participants, rec.bytes_up):
        up_per_client[i] += b
coverage = np.array([server.coverage[nm].numpy() for nm in names])  # (modules, r)
expected = (sum(ranks[i] for i in participants)
            + sum(sum(rec.client_ranks) for rec in records)) / lora_cfg.rank
print(f"coverage: mean {coverage.mean():.1f}, min {coverage.min()}, max {coverage.max()} "
      f"(expected {expected:.1f} per index)")
print("KiB uploaded per client over the run:", np.round(up_per_client / 1024, 1).tolist())

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
rounds = [0, 1] + [rec.round for rec in records]
losses = [loss0, loss] + [rec.heldout_loss for rec in records]
axes[0].plot(rounds, losses, marker=".")
axes[0].set(xlabel="round", ylabel="global held-out loss", title="FSLoRA, 6 clients, 4 per round")
axes[1].bar(range(fed_cfg.num_clients), up_per_client / 1024, color="tab:orange")
axes[1].set_xticks(range(fed_cfg.num_clients), [f"client {i}\nk={k}" for i, k in enumerate(ranks)])
axes[1].set(ylabel="KiB uploaded (all rounds)", title="bytes each client moved up (= down)")
im = axes[2].imshow(coverage, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
axes[2].set_yticks(range(len(names)), [nm.replace("blocks.", "") for nm in names], fontsize=7)
axes[2].set(xlabel="rank index j", title=f"times each rank was trained (expected {expected:.0f})")
fig.colorbar(im, ax=axes[2])
fig.tight_layout()

# %% [markdown]
# The first point of the loss curve is the pretrained base model (LoRA starts at `B = 0`). The
# loss falls although most participants train only 1 or 2 of the 8 ranks per module, and the
# heatmap is flat up to sampling noise. Notebook 4 asks whether this beats the baselines at
# the same client ranks k_i.
