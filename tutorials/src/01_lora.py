# %% [markdown]
# # 1. LoRA from scratch
#
# LoRA (Hu et al. 2021, [arXiv 2106.09685](https://arxiv.org/abs/2106.09685)) fine-tunes a
# frozen weight `W0` (m x n) by adding a low-rank product:
#
#     W = W0 + s * B @ A,     B: m x r (starts at 0),   A: r x n (starts random),   s = alpha / r
#
# Only `B` and `A` are trained: `r (m + n)` numbers instead of `m n`. This notebook takes the
# project's layer, `fslora_min.lora.LoRALinear`, apart: its shapes and its init, the scale `s`,
# training it on a small regression, `merge()` / `unmerge()`, and what LoRA saves on the
# project's transformer against full fine-tuning. Nothing here is re-implemented: every
# function comes from the library.
#
# First, the setup every tutorial shares: find the repository root (the notebook may be
# opened from `tutorials/`), make the library importable, and fix the seed. `FAST` is set by
# the test suite (`FSLORA_FAST=1`) to run every notebook at small sizes.

# %%
import os
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "fslora_min").is_dir())
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the library's caches and results are relative to the repository root
FAST = os.environ.get("FSLORA_FAST") == "1"
SEED = 0

import matplotlib.pyplot as plt
import torch
import torch.nn as nn

from fslora_min.lora import LoRALinear, apply_lora, count_lora_parameters, lora_modules, lora_scale
from fslora_min.model import ModelConfig, Transformer, count_parameters

torch.manual_seed(SEED)
torch.set_num_threads(1)  # tiny tensors: more threads only contend for a shared CPU
print(f"seed {SEED}, device cpu, torch {torch.__version__}, threads 1, fast mode {FAST}")

# %% [markdown]
# ## The layer and its init
#
# `LoRALinear` wraps an `nn.Linear`: it copies the weight and bias as frozen parameters and adds
# `lora_B` (m x r) and `lora_A` (r x n). `B = 0` at init, so `B A = 0` and the layer computes
# exactly what its base did: fine-tuning starts from the pretrained model. `A` is random so
# that the gradient of `B` (which is `s * grad_W @ A^T`) is not zero at the first step.

# %%
m, n, r, alpha = 48, 64, 8, 16.0
base = nn.Linear(n, m)
layer = LoRALinear(base, r=r, alpha=alpha, generator=torch.Generator().manual_seed(SEED))
print(layer)
for name, p in layer.named_parameters():
    print(f"  {name:7s} {str(tuple(p.shape)):9s} trainable={p.requires_grad}")

x = torch.randn(5, n)  # a batch of 5 inputs
print("max |layer(x) - base(x)| at init:", (layer(x) - base(x)).abs().max().item())
print("|B| =", layer.lora_B.norm().item(), " |A| =", round(layer.lora_A.norm().item(), 3))

# %% [markdown]
# ## The scale s
#
# The update is `s * B @ A` with `s = alpha / r`. Dividing by `r` keeps the size of the update
# about the same when you change the rank, so a learning rate tuned at one rank transfers.
# rsLoRA (Kalajdzievski 2023, [arXiv 2312.03732](https://arxiv.org/abs/2312.03732)) argues
# that `alpha / sqrt(r)` is the scale that keeps learning stable at large `r`; the layer takes
# it as `rslora=True`. FSLoRA keeps `s` of the *global* rank `r` and lets a client that trains
# only `k` of the `r` ranks use `s * r / k` (notebook 2).

# %%
ranks = [1, 2, 4, 8, 16, 32, 64]
plain = [lora_scale(alpha, q) for q in ranks]
rs = [lora_scale(alpha, q, rslora=True) for q in ranks]
for q, a, b in zip(ranks, plain, rs):
    print(f"r={q:3d}  alpha/r={a:7.3f}  alpha/sqrt(r)={b:7.3f}")

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.loglog(ranks, plain, "o-", label="alpha / r (LoRA)")
ax.loglog(ranks, rs, "s-", label="alpha / sqrt(r) (rsLoRA)")
ax.set(xlabel="rank r", ylabel="scale s", title=f"LoRA scale, alpha = {alpha:g}")
ax.legend();

# %% [markdown]
# ## Training only B and A
#
# A small regression: targets come from `W0 + dW`, where `dW` has rank 4, so a rank-8 LoRA can
# represent it exactly. We optimise only the layer's trainable parameters (`B` and `A`) with
# Adam and watch the loss fall while `W0` stays untouched. The learned update `s B A` has at
# most `r` non-zero singular values, whatever the data: that is the low-rank constraint.

# %%
g = torch.Generator().manual_seed(SEED)
dW = (torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)) / n**0.5  # rank 4
X = torch.randn(512, n, generator=g)
Y = X @ (base.weight + dW).detach().T + base.bias.detach()

W0_before = layer.weight.detach().clone()
trainable = [p for p in layer.parameters() if p.requires_grad]
print("trainable numbers:", sum(p.numel() for p in trainable), "= r (m + n) =", r * (m + n),
      "| frozen:", m * n + m)
opt = torch.optim.Adam(trainable, lr=1e-2)
steps = 100 if FAST else 600
losses = []
for step in range(steps):
    loss = ((layer(X) - Y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"loss {losses[0]:.4f} -> {losses[-1]:.6f} in {steps} Adam steps")
print("W0 changed:", not torch.equal(W0_before, layer.weight))

sv = torch.linalg.svdvals(layer.delta_weight().detach())
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].semilogy(losses)
axes[0].set(xlabel="Adam step", ylabel="mean squared error", title="training B and A only")
axes[1].semilogy(sv[:16], "o", label="learned s B A")
axes[1].semilogy(torch.linalg.svdvals(dW)[:16], "x", label="target dW (rank 4)")
axes[1].axvline(r - 0.5, color="gray", ls=":", label=f"r = {r}")
axes[1].set(xlabel="index", ylabel="singular value", title="the update has rank <= r")
axes[1].legend()
fig.tight_layout()

# %% [markdown]
# ## merge() and unmerge()
#
# For inference the product can be folded into the weight, `W0 <- W0 + s B A`, so the layer is
# one plain matmul again: `merge()`. `unmerge()` subtracts it back (exact up to float rounding).
# Both are explicit calls, never a side effect of `train()` / `eval()`, and a merged layer
# refuses to run sketched (it would add the update twice).

# %%
with torch.no_grad():
    y_lora = layer(x)
    layer.merge()
    y_merged = layer(x)
    print("merged:", layer.merged, "| max |merged - unmerged output|:",
          (y_merged - y_lora).abs().max().item())
    layer.unmerge()
    print("unmerged:", layer.merged, "| max |W0 after - W0 before|:",
          (layer.weight - W0_before).abs().max().item())
try:
    layer.unmerge()
except RuntimeError as err:
    print("a second unmerge() raises:", err)

# %% [markdown]
# ## What LoRA saves on the project's transformer
#
# `apply_lora` swaps every `q, k, v, out` (attention) and `fc, proj` (MLP) linear layer of the
# project's 4-layer, width-128 transformer for a `LoRALinear` and freezes everything else.
# Modules are found by type, never by matching parameter names (a name that never matches
# would silently train nothing). We count the LoRA numbers `sum r (m + n)` against full
# fine-tuning of the same layers (`sum m n`) and of the whole model, and the fp32 bytes a client
# would send per round for each.

# %%
cfg = ModelConfig()
model = Transformer(cfg)
total = count_parameters(model)
names = apply_lora(model, r=16, alpha=32.0)
modules = lora_modules(model)
adapted = sum(mod.in_features * mod.out_features for _, mod in modules)
print(f"{cfg}\nbase model: {total:,} parameters; {len(names)} LoRA modules, e.g. {names[:6]}")
print(f"trainable after apply_lora(r=16): {count_parameters(model, trainable_only=True):,} "
      f"= count_lora_parameters {count_lora_parameters(model):,}")
print(f"\n{'r':>4} {'LoRA numbers':>13} {'% of adapted W':>15} {'% of model':>11} "
      f"{'fp32 KiB':>9}")
lora_counts = []
for q in ranks:
    qm = Transformer(cfg)
    apply_lora(qm, r=q, alpha=2.0 * q)
    c = count_lora_parameters(qm)
    lora_counts.append(c)
    print(f"{q:4d} {c:13,} {100 * c / adapted:14.2f}% {100 * c / total:10.2f}% {4 * c / 1024:9.1f}")
print(f"full fine-tuning of the adapted layers: {adapted:,} numbers ({4 * adapted / 1024:.0f} KiB);"
      f" of the whole model: {total:,}")

fig, ax = plt.subplots(figsize=(5.5, 3.4))
ax.loglog(ranks, lora_counts, "o-", label="LoRA: sum r (m + n)")
ax.axhline(adapted, color="C3", ls="--", label="full fine-tuning of the same layers")
ax.axhline(total, color="gray", ls=":", label="whole model")
ax.set(xlabel="LoRA rank r", ylabel="trainable numbers", title="LoRA against full fine-tuning")
ax.legend(fontsize=8);

# %% [markdown]
# At `r = 16` a client trains and sends a fifth of the adapted layers' numbers here (18.75%);
# at LLM widths (m = n = 4096) the same rank is 0.8% of them, since `r (m + n) / (m n)` falls
# like `1 / width`. In a federation even that is too much for small devices: notebook 2 shows
# how FSLoRA lets a client train a random `k` of the `r` ranks instead.
