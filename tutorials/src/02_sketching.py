# %% [markdown]
# # 2. Sketching: training k of the r ranks
#
# In FSLoRA (Fang et al., [arXiv 2501.19389](https://arxiv.org/abs/2501.19389)) the server
# holds a rank-`r` LoRA, but client `i` can afford only rank `k_i`. Each round it gets a random
# *sketch*
#
#     S = (r / k) * sum_{j in I} e_j e_j^T,      I a uniform k-subset of {0, ..., r-1},
#
# an r x r diagonal matrix with `k` entries equal to `r / k`, and trains the layer
# `W0 + s B S A = W0 + s (r/k) B[:, I] A[I, :]`: a rank-`k` LoRA made of `k` columns of `B` and
# the matching rows of `A`. This notebook shows what `S` is, why it is unbiased (`E[S] = I`), and
# what it costs: the variance of `B S A` around `B A`, against the sketching ratio `k / r`.
#
# Setup: repository root, seed, one thread (the tensors are tiny).

# %%
import os
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "fslora_min").is_dir())
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
FAST = os.environ.get("FSLORA_FAST") == "1"
SEED = 0

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

from fslora_min.lora import CompactFactors, LoRALinear, compact_factors, sketched
from fslora_min.sketch import sample_sketch
from theory.enumeration import all_sketch_diagonals
from theory.sketch_moments import sketch_variance

torch.manual_seed(SEED)
torch.set_num_threads(1)  # tiny tensors: more threads only contend for a shared CPU
g = torch.Generator().manual_seed(SEED)
print(f"seed {SEED}, device cpu, torch {torch.__version__}, threads 1, fast mode {FAST}")

# %% [markdown]
# ## What a sketch is
#
# The code never builds `S` as a matrix: a `Sketch` is the index set `I` and the scale `r / k`.
# `diagonal()` gives `diag(S)` as a dense vector, for tests and pictures only. Below, six sketches
# for `r = 8, k = 2`, drawn as the r x r matrices they stand for: each keeps 2 ranks at weight 4.

# %%
r, k = 8, 2
sketches = [sample_sketch(r, k, g) for _ in range(6)]
for sk in sketches[:3]:
    print(f"I = {sk.indices.tolist()}, sketch weight r/k = {sk.sketch_weight:g}, diag(S) = {sk.diagonal().tolist()}")

fig, axes = plt.subplots(1, 6, figsize=(12, 2.3))
for ax, sk in zip(axes, sketches):
    ax.imshow(torch.diag(sk.diagonal()), cmap="Blues", vmin=0, vmax=r / k)
    ax.set(title=f"I = {sk.indices.tolist()}", xticks=[], yticks=[])
fig.suptitle(f"six sketches S, r = {r}, k = {k} (dark = r/k = {r // k}, white = 0)", y=1.05);

# %% [markdown]
# ## Unbiased: E[S] = I, and E[S^2] = (r/k) I
#
# Each index is in `I` with probability `k / r`, and then weighs `r / k`: on average, 1. So
# `E[S] = I_r` and `E[B S A] = B A`: the sketched layer is, in expectation, the full LoRA. The
# price is the second moment, `E[S_jj^2] = (r/k)^2 (k/r) = r/k`. For small `r` we can average
# over *every* index set (`theory.enumeration`): the identities hold exactly. For larger `r` we
# sample with the library's sampler and watch the average of `B S A` approach `B A` like
# `1 / sqrt(samples)`.

# %%
for rr, kk in [(6, 2), (8, 3), (10, 5)]:
    d = all_sketch_diagonals(rr, kk)  # (C(r, k), r): every index set, equally likely
    print(f"r={rr:2d} k={kk}: {len(d):3d} index sets; max |E[S_jj] - 1| = "
          f"{(d.mean(0) - 1).abs().max():.1e}; E[S_jj^2] = {(d ** 2).mean(0)[0]:.4f} "
          f"(r/k = {rr / kk:.4f})")

r, k, m, n = 16, 4, 12, 10
B, A = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)  # (m, r), (r, n)
samples = 2000 if FAST else 20000
d = torch.stack([sample_sketch(r, k, g).diagonal().float() for _ in range(samples)])  # (s, r)
BSA = torch.einsum("mr,sr,rn->smn", B, d, A)  # (s, m, n): B S A for every sample
counts = np.unique(np.logspace(1, math.log10(samples), 30).astype(int))
running = BSA.cumsum(0)[counts - 1] / torch.as_tensor(counts)[:, None, None]
rel_err = ((running - B @ A).norm(dim=(1, 2)) / (B @ A).norm()).numpy()
print(f"\nr={r} k={k}, {samples} samples: mean diag(S) in [{d.mean(0).min():.3f}, "
      f"{d.mean(0).max():.3f}], mean diag(S)^2 = {(d ** 2).mean():.3f} (r/k = {r / k:g})")
print(f"|mean(B S A) - B A| / |B A| = {rel_err[-1]:.4f} after {samples} samples")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].bar(range(r), d.mean(0).numpy(), color="C0")
axes[0].axhline(1, color="k", ls="--")
axes[0].set(xlabel="rank index j", ylabel="mean of S_jj", ylim=(0, 1.3),
            title=f"E[S] = I  ({samples} sketches, r={r}, k={k})")
axes[1].loglog(counts, rel_err, "o-", label="|mean of B S A - B A| / |B A|")
axes[1].loglog(counts, rel_err[0] * (counts[0] / counts) ** 0.5, "k:", label="1 / sqrt(samples)")
axes[1].set(xlabel="number of sketches averaged", title="E[B S A] = B A")
axes[1].legend()
fig.tight_layout()

# %% [markdown]
# ## The variance against the sketching ratio
#
# One sketch is unbiased but noisy. The exact variance (docs/method.md section 6, with `b_j` column
# `j` of `B` and `a_j` row `j` of `A`) is
#
#     E||B S A - B A||^2 = (r/k - 1) * ( sum_j |b_j|^2 |a_j|^2 - 1/(r-1) sum_{j != l} (b_j.b_l)(a_j.a_l) )
#
# It is zero at `k = r` (no sketch) and grows like `r / k` as the ratio shrinks. We compare
# `theory.sketch_moments.sketch_variance` (the formula) with a Monte Carlo estimate from the
# library's sampler for every `k` of `r = 16`, relative to `|B A|^2`. This is the noise a small
# client adds to the federation, and what the theory's `sigma_s^2` measures (notebook 6).

# %%
Bd, Ad = B.double(), A.double()
per_k = 300 if FAST else 4000
ks = list(range(1, r + 1))
exact, mc, se = [], [], []
for kk in ks:
    dk = torch.stack([sample_sketch(r, kk, g).diagonal() for _ in range(per_k)])  # (s, r)
    err = ((torch.einsum("mr,sr,rn->smn", Bd, dk, Ad) - Bd @ Ad) ** 2).sum((1, 2))  # (s,)
    exact.append(sketch_variance(Bd, Ad, kk))
    mc.append(err.mean().item())
    se.append(err.std().item() / per_k**0.5)
scale = float((Bd @ Ad).pow(2).sum())
print(f"{'k':>3} {'k/r':>6} {'formula':>10} {'sampled':>10} {'+-2 se':>8}  (relative to |B A|^2)")
for kk, e, s_, u in zip(ks, exact, mc, se):
    if kk in (1, 2, 4, 8, 12, 16):
        print(f"{kk:3d} {kk / r:6.3f} {e / scale:10.4f} {s_ / scale:10.4f} {2 * u / scale:8.4f}")

q = np.array(ks) / r
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.plot(q, np.array(exact) / scale, "-", color="k", label="formula")
ax.errorbar(q, np.array(mc) / scale, yerr=2 * np.array(se) / scale, fmt="o", color="C1",
            capsize=3, label=f"sampled ({per_k} sketches per k, +-2 se)")
ax.set(xlabel="sketching ratio k/r", ylabel="E|B S A - B A|^2 / |B A|^2", yscale="log",
       title=f"sketch variance, r = {r}: zero at k = r, ~ r/k below")
ax.legend();

# %% [markdown]
# ## The sketched layer and the client's compact layer
#
# Inside `sketched(...)` a `LoRALinear` computes `W0 + s (r/k) B[:, I] A[I, :]` on the global
# factors, and gradients reach only the columns of `B` and the rows of `A` in `I`: **one index
# set per module, shared by `B` and `A`** (public code has drawn them separately, which is a
# different and biased method). A client never even holds the full factors: inside
# `compact_factors(...)` the layer runs on its own `b = B[:, I]` (m x k) and `a = A[I, :]`
# (k x n), the same function, with `k (m + n)` trainable numbers.

# %%
r, k, m, n = 8, 3, 6, 5
model = nn.Sequential(LoRALinear(nn.Linear(n, m), r=r, alpha=16.0,
                                 generator=torch.Generator().manual_seed(SEED)))
lora = model[0]
with torch.no_grad():
    lora.lora_B.normal_(generator=g)  # pretend training has moved B away from 0
sk = sample_sketch(r, k, g)
x = torch.randn(4, n, generator=g)
with sketched(model, {"0": sk}):
    y = model(x)
y.square().sum().backward()
W = lora.weight + lora.scale * (r / k) * lora.lora_B[:, sk.indices] @ lora.lora_A[sk.indices]
print("I =", sk.indices.tolist(), "| max |sketched - W0 + s (r/k) B[:, I] A[I, :]| =",
      (y - (x @ W.T + lora.bias)).abs().max().item())
print("columns of B with a gradient:", torch.nonzero(lora.lora_B.grad.abs().sum(0)).flatten().tolist())
print("rows of A with a gradient:   ", torch.nonzero(lora.lora_A.grad.abs().sum(1)).flatten().tolist())

b = lora.lora_B.detach()[:, sk.indices].clone().requires_grad_(True)  # (m, k)
a = lora.lora_A.detach()[sk.indices].clone().requires_grad_(True)  # (k, n)
with compact_factors(model, {"0": CompactFactors(b, a, sk)}):
    y_compact = model(x)
print(f"compact layer: b {tuple(b.shape)}, a {tuple(a.shape)}: {b.numel() + a.numel()} trainable "
      f"numbers = k (m + n) = {k * (m + n)} (full LoRA: r (m + n) = {r * (m + n)}); "
      f"max |compact - sketched| = {(y_compact - y).abs().max().item():.1e}")

# %% [markdown]
# So a client with ratio `k / r` trains, stores and sends `k / r` of the LoRA numbers, and
# because `E[S] = I` the average of many such clients points where full-rank LoRA would.
# Notebook 3 puts clients of different ratios together in a federation.
