"""Long runs of each method on a planted low-rank target, against theory/sketch_bias.py.

One m x n layer, the population loss F(W0 + M) - F(W*) = 1/2 ||M - Delta||^2 (isotropic inputs,
exact gradients, no data noise), N identical clients, full participation, H local gradient steps
of size `lr` (the same for every client) on the compact factors each client trains, and each
method's server step as fslora_min/methods.py does it:

    fslora       uniform k_i-subset, client scale s r / k_i, zero-padded average of the deltas
    fedavg-*     every rank of a rank-R LoRA (R = min_i k_i or r), scale alpha / R, average
    hetlora      the first k_i ranks at the global scale s, zero-padded average of the deltas
    flexlora     client i starts from the best rank-k_i factors of the server's M (scale
                 alpha / k_i; a fresh LoRA while M = 0); M <- sum_i p_i s_i b_i a_i
    flora        a fresh LoRA (b = 0) per round on top of M; M <- M + sum_i p_i s_i b_i a_i

The observed fixed point is F's excess averaged over the last quarter of the rounds (FSLoRA's
sketches keep it moving; the others settle), against `predicted_fixed_point`. The exact sketched
objective is checked separately: gradient descent on f^S averaged over ALL index sets
(theory/lsq_problem.py, whitened inputs, no noise) against the closed-form minimum.

    python -m theory.bias_runs [--quick]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import trange  # noqa: E402

from theory.lsq_problem import LSQConfig, LSQProblem  # noqa: E402
from theory.report import Check, exit_code, print_checks, save_figure, script_parser, setup  # noqa
from theory.sketch_bias import FIXED_POINT_METHODS, predicted_fixed_point  # noqa: E402


RTOL = 0.02  # each fixed point; FSLoRA's after the extrapolation to lr -> 0 (+ 3 std errors)


@dataclass
class SimConfig:
    spectrum: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4, 0.2)  # sigma_l of Delta
    m: int = 16
    n: int = 16
    rank: int = 8  # r
    client_ranks: tuple[int, ...] = (2, 2, 2, 2)  # k_i
    alpha: float = 8.0  # s = alpha / r
    lr: float = 0.1
    local_steps: int = 1  # H (FSLoRA's closed form is the small-step limit: H = 1 stays near it)
    rounds: int = 3000
    seed: int = 0


def client_steps(b: np.ndarray, a: np.ndarray, c: float, target: np.ndarray, lr: float,
                 H: int) -> tuple[np.ndarray, np.ndarray]:
    """H gradient steps on 1/2 ||c b a - target||^2 over (b (m, k), a (k, n))."""
    for _ in range(H):
        R = c * b @ a - target  # (m, n)
        b, a = b - lr * c * R @ a.T, a - lr * c * b.T @ R
    return b, a


def best_factors(M: np.ndarray, k: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """b = U_k sqrt(S_k / c), a = sqrt(S_k / c) V_k^T: c b a is M's best rank-k approximation."""
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    root = np.sqrt(S[:k] / c)
    return U[:, :k] * root, root[:, None] * Vt[:k]


def simulate(method: str, cfg: SimConfig) -> np.ndarray:
    """F's excess 1/2 ||M - Delta||^2 after every round of `method` (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    m, n, r, N = cfg.m, cfg.n, cfg.rank, len(cfg.client_ranks)
    rho = len(cfg.spectrum)
    U = np.linalg.qr(rng.standard_normal((m, rho)))[0]
    V = np.linalg.qr(rng.standard_normal((n, rho)))[0]
    delta = (U * np.array(cfg.spectrum)) @ V.T  # (m, n)
    R = {"fedavg-min": min(cfg.client_ranks), "fedavg-full": r}.get(method, r)
    s = cfg.alpha / R
    B, A = np.zeros((m, R)), rng.standard_normal((R, n)) / np.sqrt(n)  # global factors
    M = np.zeros((m, n))  # flexlora / flora: the server's product
    excess = np.zeros(cfg.rounds)
    for t in trange(cfg.rounds, desc=method, leave=False, mininterval=1.0):
        dB, dA, new_M = np.zeros_like(B), np.zeros_like(A), np.zeros_like(M)
        for k in cfg.client_ranks:
            if method in ("flexlora", "flora"):
                c = cfg.alpha / k
                if method == "flora" or not M.any():
                    b0, a0 = np.zeros((m, k)), rng.standard_normal((k, n)) / np.sqrt(n)
                else:
                    b0, a0 = best_factors(M, k, c)
                target = delta - M if method == "flora" else delta
                b, a = client_steps(b0, a0, c, target, cfg.lr, cfg.local_steps)
                new_M += c * b @ a / N
                continue
            if method == "fslora":
                idx, c = np.sort(rng.choice(R, k, replace=False)), s * R / k
            elif method == "hetlora":
                idx, c = np.arange(k), s
            else:  # fedavg
                idx, c = np.arange(R), s
            b, a = client_steps(B[:, idx], A[idx], c, delta, cfg.lr, cfg.local_steps)
            dB[:, idx] += (b - B[:, idx]) / N
            dA[idx] += (a - A[idx]) / N
        if method == "flexlora":
            M = new_M
        elif method == "flora":
            M = M + new_M
        else:
            B, A = B + dB, A + dA
            M = s * B @ A
        excess[t] = 0.5 * ((M - delta) ** 2).sum()
    return excess


def observed_fixed_point(excess: np.ndarray) -> float:
    """Mean excess over the last quarter of the rounds."""
    return float(excess[-len(excess) // 4:].mean())


def sketched_gd_minimum(ranks: tuple[int, ...], spectrum: tuple[float, ...], r: int,
                        steps: int, lr: float) -> tuple[float, float]:
    """Gradient descent on the exact f^S (all index sets, theory/lsq_problem.py; whitened inputs,
    no noise, so f_i^S - F(W*) is the sketched objective in the units of sketch_bias.py):
    returns (f^S - F(W*), F - F(W*)) at its end, and F(W*) = 0 here."""
    problem = LSQProblem(LSQConfig(m=r, n=r, r=r, ranks=ranks, samples=4 * r, noise=0.0,
                                   heterogeneity=0.0, spectrum=spectrum, whiten=True,
                                   shared_data=True))
    x = problem.x0.clone()
    for _ in trange(steps, desc=f"GD on f^S k={ranks}", leave=False, mininterval=1.0):
        x = x - lr * problem.sketched_grad(x)
    plain = problem.loss(x, problem.Z[0], problem.Y[0], torch.ones(r))
    return float(problem.sketched_loss(x)), float(plain)


def standard_error(excess: np.ndarray, blocks: int = 4) -> float:
    """The standard error of `observed_fixed_point` from the spread of `blocks` block means of
    the last quarter (the sketches keep FSLoRA moving: its mean fluctuates by a few %)."""
    late = excess[-len(excess) // 4:]
    means = np.array([b.mean() for b in np.array_split(late, blocks)])
    return float(means.std(ddof=1) / np.sqrt(blocks))


def small_step_fixed_point(cfg: SimConfig) -> tuple[float, float, float, float]:
    """FSLoRA's observed fixed point at lr and at lr / 2 (twice the rounds), their linear
    extrapolation to lr -> 0, 2 obs(lr/2) - obs(lr), and its standard error: the closed form is
    the small-step limit, and the sampled rounds sit O(lr) off it (the finite-step offset)."""
    a = simulate("fslora", cfg)
    b = simulate("fslora", replace(cfg, lr=cfg.lr / 2, rounds=2 * cfg.rounds))
    at_lr, half = observed_fixed_point(a), observed_fixed_point(b)
    error = math.hypot(2 * standard_error(b), standard_error(a))
    return at_lr, half, 2 * half - at_lr, error


def fslora_check(label: str, cfg: SimConfig, rtol: float) -> tuple[Check, float]:
    """The lr -> 0 extrapolation against the closed form, within rtol plus 3 standard errors;
    the offsets at lr and lr / 2 noted."""
    pred = predicted_fixed_point("fslora", cfg.spectrum, cfg.rank, cfg.client_ranks).excess_loss
    at_lr, half, zero, error = small_step_fixed_point(cfg)
    return Check(f"{label} fslora: excess F, lr -> 0", zero, pred, "==", rtol=rtol,
                 atol=3 * error,
                 note=f"finite-step offset {at_lr / pred - 1:+.3f} at lr {cfg.lr:g}, "
                      f"{half / pred - 1:+.3f} at lr {cfg.lr / 2:g}; tolerance {rtol:g} + 3 "
                      f"standard errors ({3 * error / pred:.3f})"), at_lr


def run_checks(cfgs: dict[str, SimConfig], rtol: float) -> tuple[list[Check], list[str]]:
    """Every method's observed fixed point against its prediction, for each configuration
    (FSLoRA's extrapolated to lr -> 0, `fslora_check`)."""
    checks, lines = [], []
    for label, cfg in cfgs.items():
        checks.append(fslora_check(label, cfg, rtol)[0])
        for method in FIXED_POINT_METHODS[1:]:
            pred = predicted_fixed_point(method, cfg.spectrum, cfg.rank, cfg.client_ranks,
                                         lr=cfg.lr, local_steps=cfg.local_steps, alpha=cfg.alpha)
            obs = observed_fixed_point(simulate(method, cfg))
            checks.append(Check(f"{label} {method}: excess F", obs, pred.excess_loss, "==",
                                rtol=rtol, atol=1e-3 * sum(x * x for x in cfg.spectrum)))
        lines.append(f"{label}: {cfg}")
    return checks, lines


def plot(spectrum: tuple[float, ...], runs: dict[tuple[int, int], float], folder: str) -> None:
    """Predicted excess against r at fixed k, and against k/r at r = 8 (markers: long runs)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    total = 0.5 * sum(x * x for x in spectrum)
    for i, k in enumerate((1, 2, 4)):
        rs = np.arange(k, 33)
        pred = [predicted_fixed_point("fslora", spectrum, r, (k,)).excess_loss for r in rs]
        axes[0].plot(rs, pred, "-", color=f"C{i}", label=f"FSLoRA, k = {k} (closed form)")
        axes[0].axhline(predicted_fixed_point("fedavg-min", spectrum, k, (k,)).excess_loss,
                        color=f"C{i}", ls=":", lw=1)
        pts = [(r, v) for (kk, r), v in runs.items() if kk == k]
        if pts:
            axes[0].plot(*zip(*pts), "o", color=f"C{i}", mfc="none", ms=8)
    axes[0].plot([], [], "k:", label="rank-k LoRA (FedAvg at k)")
    axes[0].plot([], [], "ko", mfc="none", label="long FSLoRA runs")
    axes[0].set(xlabel="global rank r", ylabel="excess loss at the fixed point",
                title=f"FSLoRA's bias against r at fixed k (target rank {len(spectrum)})",
                ylim=(0, 1.05 * total))
    axes[0].legend(fontsize=8)
    r = 8
    ks = np.arange(1, r + 1)
    labels = {"fslora": "fslora (closed form)",  # with every client at k, fedavg-min, hetlora
              "fedavg-min": "rank-k LoRA: fedavg-min = hetlora = flexlora",  # and flexlora agree
              "fedavg-full": "rank-r LoRA: fedavg-full (flora: also 0)"}
    for j, (method, label) in enumerate(labels.items()):
        vals = [predicted_fixed_point(method, spectrum, r, (k,)).excess_loss for k in ks]
        axes[1].plot(ks / r, vals, "o-" if method == "fslora" else "s--", color=f"C{j + 3}",
                     label=label)
    axes[1].plot([runs_k / 8 for runs_k, rr in runs if rr == 8],
                 [v for (runs_k, rr), v in runs.items() if rr == 8], "o", color="C3", mfc="none",
                 ms=10, label="long FSLoRA runs")
    axes[1].set(xlabel="sketching ratio k/r (every client alike), r = 8",
                ylabel="excess loss at the fixed point", title="against k/r, with the baselines")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Closed-form fixed points on a planted target, spectrum {spectrum}")
    save_figure(fig, folder, "sketch_bias.png")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    args = parser.parse_args(argv)
    setup(args.seed)
    rounds, gd_steps = (2000, 1500) if args.quick else (4000, 6000)
    spectrum = SimConfig.spectrum
    cfgs = {"k=2 of r=8": SimConfig(client_ranks=(2,) * 4, rounds=rounds, seed=args.seed),
            # lr 0.05: a rank-1 FedAvg-LoRA (scale alpha / 1 = 8) diverges at 0.1; 6x the
            # rounds: the smallest component, trained by one client of four (HetLoRA), is slow
            "k=1,2,4,6 of 8": SimConfig(client_ranks=(1, 2, 4, 6), lr=0.05, rounds=6 * rounds,
                                        seed=args.seed)}
    checks, lines = run_checks(cfgs, rtol=RTOL)
    for ranks in ((2,) * 4, (1, 2, 4, 6)):
        fs, plain = sketched_gd_minimum(ranks, spectrum, 8, gd_steps, 0.3)
        pred = predicted_fixed_point("fslora", spectrum, 8, ranks)
        checks += [Check(f"GD on exact f^S, k={ranks}: min f^S", fs, pred.objective_excess, "==",
                         rtol=1e-6),
                   Check(f"GD on exact f^S, k={ranks}: F there", plain, pred.excess_loss, "==",
                         rtol=1e-5)]
    runs = {}
    for k, r in ((2, 4), (2, 8), (2, 16), (4, 8), (4, 16)):
        cfg = SimConfig(rank=r, client_ranks=(k,) * 4, rounds=rounds, seed=args.seed)
        check, runs[(k, r)] = fslora_check(f"k={k} r={r}", cfg, RTOL)
        checks.append(check)
    print("\n".join(lines))
    print_checks("fixed points: long runs against the closed forms", checks)
    plot(spectrum, runs, args.figures)
    return exit_code(checks)


if __name__ == "__main__":
    raise SystemExit(main())
