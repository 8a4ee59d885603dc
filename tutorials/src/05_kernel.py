# %% [markdown]
# # 5. The kernel: a masked low-rank matmul
#
# A sketched LoRA layer computes
#
#     y = x W0^T + bias + c (x A[I]^T) B[:, I]^T,      c = s r / k,   I = the k sketched ranks
#
# `kernels/reference.py` does it in plain PyTorch by gathering `B[:, I]` and `A[I]` into new
# tensors and running three matmuls. `kernels/` also has a fused Triton version: a *skinny*
# kernel computes `u = c x A[I]^T` (T x k) in one read of `x`, and the base GEMM's loop ends with
# one extra step `u B[:, I]^T` into the same accumulator, so `y` is written once; the backward
# reads `dy` once for both LoRA products that reduce over it (`g = c dy B[:, I]` and
# `dB[:, I] = dy^T u`) and once for `dx`; the gathers happen inside the kernels through the
# index tensor (a new sketch never recompiles). This
# notebook checks the two against each other, forward and backward, and shows how to read the
# GPU benchmark the project committed (`results/kernels/`).
#
# Triton kernels need a GPU, or Triton's *interpreter*, which runs them on the CPU (slowly) and
# must be switched on **before** `triton` is first imported. So the first cell sets
# `TRITON_INTERPRET=1` when there is no GPU, before importing the library.

# %%
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "fslora_min").is_dir())
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
FAST = os.environ.get("FSLORA_FAST") == "1"
SEED = 0

import json
import time

import matplotlib.pyplot as plt
import numpy as np
import triton

from kernels import lora_linear
from kernels.reference import lora_linear_reference
from kernels.report import decision_table, failures, goal_table, load_runs, meets, readme_source
from fslora_min.sketch import sample_sketch

torch.manual_seed(SEED)
torch.set_num_threads(1)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"seed {SEED}, device {device}, torch {torch.__version__}, triton {triton.__version__}, "
      f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, fast mode {FAST}")

# %% [markdown]
# ## One entry point, two backends
#
# `kernels.lora_linear(x, weight, bias, lora_B, lora_A, index, client_scale, backend)` is what
# the LoRA layer calls. `backend="torch"` is the reference; `"triton"` the fused kernels; `"auto"`
# (the layer's default) picks Triton for CUDA tensors and the reference otherwise. We draw a sketch
# (`k = 4` of `r = 16` ranks), a ragged shape (T, n, m not multiples of any tile), and compare
# both backends, in fp32, with a float64 run of the reference as the judge. The Triton path's
# base GEMM comes three ways (`gemm=`: Triton with pointer loads, the default; Triton with TMA
# descriptors; cuBLAS on the merged weight `W0 + c B[:, I] A[I]`); all three must agree too.

# %%
g = torch.Generator().manual_seed(SEED)
T, n, m, r, k = (24, 40, 36, 16, 4) if FAST else (100, 72, 56, 16, 4)
sk = sample_sketch(r, k, g)
c = 2.0 * r / k  # s r / k with s = alpha / r = 2
x = torch.randn(T, n, generator=g)
W0, bias = torch.randn(m, n, generator=g) / n**0.5, torch.randn(m, generator=g)
B, A = torch.randn(m, r, generator=g) / r**0.5, torch.randn(r, n, generator=g) / n**0.5
print(f"x {tuple(x.shape)}, W0 {tuple(W0.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)}, "
      f"I = {sk.indices.tolist()}, c = {c:g}")


def run(backend: str, dtype: torch.dtype, gemm: str = "pointer") -> dict[str, torch.Tensor]:
    """y and the gradients of sum(y * probe) w.r.t. x, B and A, for one backend."""
    xs, Bs, As = (t.to(device, dtype, copy=True).requires_grad_(True) for t in (x, B, A))
    y = lora_linear(xs, W0.to(device, dtype), bias.to(device, dtype), Bs, As,
                    sk.indices.to(device), c, backend=backend, gemm=gemm)
    probe = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=device).view_as(y)
    (y * probe).sum().backward()
    return {"y": y.detach(), "dx": xs.grad, "dB": Bs.grad, "dA": As.grad}


judge = run("torch", torch.float64)
for backend, gemm in (("torch", "pointer"), ("triton", "pointer"), ("triton", "tma"),
                      ("triton", "merged")):
    start = time.perf_counter()
    out = run(backend, torch.float32, gemm)
    seconds = time.perf_counter() - start
    errs = {name: ((out[name].double() - judge[name]).norm() / judge[name].norm()).item()
            for name in judge}
    label = backend if backend == "torch" else f"{backend}, gemm={gemm}"
    print(f"{label:22s} fp32 vs float64: "
          + "  ".join(f"{n_} {e:.1e}" for n_, e in errs.items()) + f"   ({seconds:.2f} s)")

# %% [markdown]
# All agree with float64 to fp32 rounding. (On the CPU the Triton run is slow because every
# program instance is interpreted in Python; on a GPU it is compiled.) The gradients show the
# masking: only the columns of `B` and the rows of `A` in `I` get a gradient, and the kernel
# computes exactly those (it never materialises `B[:, I]`).

# %%
tri = run("triton", torch.float32)
print("I =", sk.indices.tolist())
print("columns of B with a gradient:", torch.nonzero(tri["dB"].abs().sum(0)).flatten().tolist())
print("rows of A with a gradient:   ", torch.nonzero(tri["dA"].abs().sum(1)).flatten().tolist())
same = torch.allclose(lora_linear_reference(x, W0, bias, B, A, sk.indices, c),
                      lora_linear(x, W0, bias, B, A, sk.indices, c, backend="torch"))
print("backend='torch' is kernels.reference.lora_linear_reference:", same)

fig, axes = plt.subplots(1, 2, figsize=(10, 2.6))
for ax, name, data in ((axes[0], "dB (m x r)", tri["dB"]), (axes[1], "dA^T (n x r)", tri["dA"].T)):
    ax.imshow(data.abs().cpu() > 0, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set(title=f"non-zero entries of {name}, Triton", xlabel="rank index j")
fig.tight_layout()

# %% [markdown]
# ## How to read the committed GPU benchmark
#
# `python -m kernels.bench` (on a GPU) times, with `triton.testing.do_bench` medians, the fused
# path against cuBLAS and eager PyTorch at LLM shapes, in bf16, and writes
# `results/kernels/bench_<GPU>.json`. Four ratios, each with the goal the project set:
#
# - (a) fused forward / `F.linear` alone (how much the LoRA term costs on top of the base matmul;
#   goal <= 1.12);
# - (b) fused forward + backward / the base layer's forward + backward (goal <= 1.15);
# - (c) eager gather-based LoRA / fused (the speed-up over plain PyTorch; goal >= 1.25);
# - (d) `torch.compile` of the eager version / fused (goal >= 1.0).
#
# The fused path's base GEMM comes three ways (`gemm=` of `kernels.lora_linear`): `"pointer"`
# (Triton, the default), `"tma"` (Triton with TMA descriptors on a persistent grid) and
# `"merged"` (cuBLAS on `W0 + c B[:, I] A[I]`). A run times every one it was given, each under
# `row["fused"][gemm]`, and records a way that failed its correctness gate as an error instead;
# the committed H100 run timed the pointer way alone. `kernels/report.py` reads a run
# (`python -m kernels.report` prints its tables in Markdown, `--readme` writes them into
# `kernels/README.md`). Below: each (shape, way) of the committed run and each ratio against its
# goal.

# %%
path = readme_source((ROOT / "kernels" / "README.md").read_text())  # the run kernels/README shows
bench = json.loads(path.read_text())
print(f"{path.relative_to(ROOT)}: {bench['gpu']}, torch {bench['torch']}, triton {bench['triton']}, "
      f"{bench['dtype']}; measured ceilings: GEMM {bench['ceilings']['gemm_tflops']:.0f} TFLOP/s, "
      f"copy {bench['ceilings']['copy_gbps']:.0f} GB/s")
runs = load_runs(bench)  # one record per (shape, way): the shape's times joined with the way's
for line in failures(bench):
    print(f"FAILED {line}")
print(goal_table(bench))  # the table kernels/README.md shows (Markdown)
ratios = list(bench["goals"])

labels = [f"{r_['T']}x{r_['n']}x{r_['m']}, k={r_['k']}, {r_['gemm']}" for r_ in runs]  # T x n x m
fig, axes = plt.subplots(2, 2, figsize=(12, 8))
for ax, q in zip(axes.flat, ratios):
    rel, goal = bench["goals"][q]
    vals = [run_.get(q, float("nan")) for run_ in runs]
    met = [meets(v, (rel, goal)) for v in vals]
    ax.bar(range(len(vals)), vals, color=["tab:green" if ok else "tab:red" for ok in met])
    ax.axhline(goal, color="k", ls="--", label=f"goal {rel} {goal}")
    ax.set_xticks(range(len(vals)), labels, fontsize=7, rotation=30, ha="right")
    ax.set(title=q, ylabel="ratio")
    ax.legend(fontsize=8)
fig.suptitle(f"{bench['gpu']}: each ratio against its goal (green: met, red: missed)")
fig.tight_layout()

# %% [markdown]
# ## Where the time goes
#
# The forward is two kernels: the fused GEMM (`part_fused_gemm`) and the skinny shrink
# (`part_shrink`). Against cuBLAS's `F.linear` (`base_fwd`) and the floor of the GEMM at the
# measured rate, `2 T n m / rate`, the bars show which part loses: if the fused GEMM alone is
# slower than cuBLAS, the LoRA step is not the problem; the base GEMM is.

# %%
rows = [run_ for run_ in runs if run_["n"] == run_["m"] and "part_fused_gemm" in run_["ms"]]
floor = [2 * row["T"] * row["n"] * row["m"] / (bench["ceilings"]["gemm_tflops"] * 1e12) * 1e3
         for row in rows]
parts = {"GEMM floor": floor,
         "cuBLAS F.linear": [row["ms"]["base_fwd"] for row in rows],
         "fused GEMM (with the LoRA step)": [row["ms"]["part_fused_gemm"] for row in rows],
         "shrink u = c x A[I]^T": [row["ms"]["part_shrink"] for row in rows]}
for row, f in zip(rows, floor):
    ms = row["ms"]
    print(f"k={row['k']:2d} {row['gemm']}: floor {f:.3f} ms, F.linear {ms['base_fwd']:.3f}, fused GEMM "
          f"{ms['part_fused_gemm']:.3f} ({f / ms['part_fused_gemm']:.0%} of the rate), shrink "
          f"{ms['part_shrink']:.3f}, fused forward {ms['fused_fwd']:.3f} ms")
fig, ax = plt.subplots(figsize=(8, 3.6))
width = 0.2
for i, (label, vals) in enumerate(parts.items()):
    ax.bar(np.arange(len(rows)) + i * width, vals, width, label=label)
ax.set_xticks(np.arange(len(rows)) + 1.5 * width, [f"k={row['k']} {row['gemm']}" for row in rows])
ax.set(ylabel="ms", title=f"forward at T={rows[0]['T']}, n=m={rows[0]['n']} (bf16, {bench['gpu']})")
ax.legend(fontsize=8);

# %% [markdown]
# Reading it: the fused path is correct but misses every speed goal (d is met at one shape
# only). The LoRA step inside the
# GEMM is cheap; the loss is the Triton base GEMM itself, which runs at about two thirds of the
# card's measured GEMM rate while cuBLAS's `F.linear` sits at the floor, and the shrink costs
# about twice its bandwidth floor. `kernels/README.md` gives the full grid. Two other ways are
# built (`gemm="tma"` and `"merged"`) and tested, but have not been timed on a GPU yet. Until one
# of them is measured faster, `backend="torch"` is the faster choice on a GPU.
#
# Why merge? Merging costs one read of `W0` and one write of the merged weight, `4 m n` bytes,
# whatever the number of tokens T; the fused step's shrink reads `x`, `2 T n` bytes. Over the
# base GEMM's `2 T n m` FLOPs at a rate F and bandwidth BW, their overheads are `2 (F/BW) / T`
# and `(F/BW) / m`: merging pays when `T > 2 m`. The cell below draws both against T for the
# committed run's measured ceilings (counts only, no timing).

# %%
ridge = bench["ceilings"]["gemm_tflops"] * 1e12 / (bench["ceilings"]["copy_gbps"] * 1e9)
tokens = np.geomspace(256, 65536, 200)
fig, ax = plt.subplots(figsize=(7, 3.6))
ax.loglog(tokens, 2 * ridge / tokens, label="merged: 4 m n bytes (any m)")
for m_ in (4096, 14336):
    ax.axhline(ridge / m_, ls="--", color="C1" if m_ == 4096 else "C2",
               label=f"fused step: the shrink's 2 T n bytes, m = {m_}")
ax.axhline(0.12, color="k", lw=0.8, label="goal (a): 12% over F.linear")
ax.set(xlabel="tokens per call T", ylabel="forward overhead over the base GEMM",
       title=f"counts at {bench['gpu']}'s measured ridge, {ridge:.0f} FLOP/byte")
ax.legend(fontsize=8)
print(f"ridge {ridge:.0f} FLOP/byte; merging breaks even with the fused step at T = 2 m")

# %% [markdown]
# ## Which way should be the default
#
# `kernels/report.py` holds the rule that will pick it from a GPU run of
# `python -m kernels.gpu_check`: a Triton GEMM way takes part only if its GEMM runs at 95% of
# cuBLAS's speed or more at the goal shape (T = 8192, n = m = 4096, k = 16); then the fastest
# forward+backward among the ways that passed their correctness gate and the PyTorch path wins,
# per shape; with no such way, the byte rule above decides (merged where T > 2 m, PyTorch
# elsewhere). Applied to the committed run, which timed the pointer way alone:

# %%
print(decision_table(bench))

# %% [markdown]
# ## What the kernels compile to, without a GPU
#
# Triton can compile for a GPU it does not have: `python -m kernels.lowering` compiles every
# autotuning config of every kernel for an H100 (sm_90) with Triton's bundled `ptxas` and reports
# the tensor-core instruction (`wgmma` is Hopper's fast one; `mma.sync` the older one), whether
# tiles arrive by TMA bulk copies or per-thread `cp.async`, shared memory per program (the H100
# has 227 KiB) and registers, with any spilled to local memory. The committed report:

# %%
lowering = json.loads((ROOT / "results/kernels/lowering/sm90_bf16_triton3.9.0.json").read_text())
limit = lowering["shared_limit_bytes"]
print(f"triton {lowering['triton']}, sm_{lowering['capability']}, T n m k = {lowering['shape']}")
for low in lowering["rows"]:
    print(f"{low['kernel']:17} {low['layout']:24} {low['tensor_cores']:6} "
          f"TMA copies {low['tma_copies']:2}, cp.async {low['async_copies']:2}, "
          f"shared {low['shared_bytes'] / limit:4.0%} of 227 KiB, {low['registers']:3} registers, "
          f"{low['local_bytes']} B spilled")
