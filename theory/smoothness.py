"""Smoothness of the fixed-sketch and the expected sketched loss (Prop. D.4; docs/method.md section 6).

For each sketching ratio k/r we measure, over the region the iterates visit,

    L         = max ||hess f_i(Y)||_2          over Y in {X, P_S X}: X visited, S drawn   (A1)
    L_fixed   = max ||hess f~_i(X; S)||_2      over X visited, S drawn
    L_sketch  = max ||hess f_i^S(X)||_2        over X visited; f_i^S = E_S f~_i(. ; S)

and check L_fixed <= (r/k) L (README.md: f~_i(X; S) = f_i(P_S X) with ||P_S||^2 = r/k),
L_fixed <= (r/k)^2 L (the paper's constant), L_sketch <= (r/k) L (Prop. D.4), printing each
ratio measured / predicted: how tight each constant is. Every norm is a power iteration on
Hessian-vector products (theory/hessian.py), which never overestimates; the checks allow
rtol for its error (1e-3 in float64; 5% for the float32 transformer).

- least squares (theory/lsq_problem.py, r = 8): the visited region is the global and local
  iterates of an FSLoRA run at that ratio; S ranges over ALL index sets, so L_sketch is exact.
- least squares at the paper's mixed ratios k_i = 1, 2, 4, 6 of 8: the GLOBAL f^S measured on
  its own, L_s = max ||hess f^S||_2 over the visited X (exact over all index sets), against
  L_bar = L mean_i (r/k_i) (Prop. D.4; checked) and L_tilde = L mean_i (r/k_i)^2, and each
  client's fixed-sketch smoothness against (r/k_i) L.
- tiny transformer (theory/tiny_transformer.py, LoRA r = 8 on every projection): the region is
  the iterates of sketched SGD (a fresh sketch per step, step size k/r, which offsets the r/k
  scale of the sketched layer); S is a few sampled sketches per point,
  and f^S is the average over M sampled sketches (a Monte Carlo estimate of E_S).

    python -m theory.smoothness [--quick] [--distort-L 0.5 (shows that the checks can fail)]
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from theory.bound import BoundConstants, L_bar, L_tilde  # noqa: E402
from theory.constants import (fixed_sketch_constants, sketched_objective_smoothness,  # noqa
                              smoothness_L)
from theory.fslora_iteration import RunConfig, run_fslora  # noqa: E402
from theory.hessian import autograd_hvp, hessian_norms, power_iteration  # noqa: E402
from theory.lsq_problem import LSQConfig, LSQProblem  # noqa: E402
from theory.report import (Check, exit_code, print_checks, script_parser,  # noqa: E402
                           save_figure, setup)
from theory.tiny_transformer import TinyConfig, TinyLoRAProblem  # noqa: E402


def lsq_smoothness(k: int, rounds: int, iters: int, g: torch.Generator) -> tuple[float, ...]:
    """(L, L_fixed, L_sketch) for the least-squares problem with every client at rank k."""
    problem = LSQProblem(LSQConfig(ranks=(k,) * 4))
    rec = run_fslora(problem, RunConfig(rounds, 2, 0.03, 0, keep_points=8), desc=f"k={k}")
    pts = torch.stack(rec.points)  # (K, p)
    K, N, p = len(pts), problem.N, pts.shape[1]
    Z, Y, D, w = problem.Z[:, None], problem.Y[:, None], problem.D, problem.w
    sketch = hessian_norms(lambda y: (problem.loss(y[..., None, :], Z, Y, D) * w).sum(-1),
                           pts[:, None].expand(K, N, p).contiguous(), iters, g)  # (K, N)
    L = smoothness_L(problem, pts, iters, g)
    return L, float(fixed_sketch_constants(problem, pts, iters, g).max()), float(sketch.max())


def mixed_smoothness(ranks: tuple[int, ...], rounds: int, iters: int,
                     g: torch.Generator) -> dict:
    """Least squares at mixed ranks k_i: L, the global f^S's own smoothness L_s, L_bar, L_tilde
    and each client's fixed-sketch smoothness, over the iterates of one FSLoRA run."""
    problem = LSQProblem(LSQConfig(ranks=ranks))
    rec = run_fslora(problem, RunConfig(rounds, 2, 0.03, 0, keep_points=8), desc=f"k={ranks}")
    pts = torch.stack(rec.points)  # (K, p)
    L = smoothness_L(problem, pts, iters, g)
    c = BoundConstants(L, 0.0, 0.0, 0.0, 0.0, 0.0, problem.ratios)
    return {"ranks": ranks, "L": L, "L_s": sketched_objective_smoothness(problem, pts, iters, g),
            "L_bar": L_bar(c), "L_tilde": L_tilde(c),
            "fixed": fixed_sketch_constants(problem, pts, iters, g), "q": np.array(problem.ratios)}


def transformer_smoothness(k: int, steps: int, n_points: int, n_sketch: int, mc: int,
                           iters: int, g: torch.Generator) -> tuple[float, ...]:
    """(L, L_fixed, L_sketch) for the tiny transformer with every module sketched to rank k."""
    prob = TinyLoRAProblem(TinyConfig())
    norm = lambda f, x: float(power_iteration(autograd_hvp(f, x), torch.randn(
        x.shape, generator=g, dtype=x.dtype), iters)[0])
    x, points = prob.x0.clone(), []
    for t in range(1, steps + 1):  # sketched SGD: the region we measure on
        S = prob.sample(k, g)
        y = x.detach().requires_grad_(True)
        x = (y - k / prob.cfg.r * torch.autograd.grad(prob.loss(y, S), y)[0]).detach()  # step k/r
        if t % (steps // n_points) == 0:
            points.append(x)
    L = Lf = Ls = 0.0
    for x in tqdm(points, desc=f"transformer k={k}", leave=False):
        L = max(L, norm(prob.loss, x))
        for _ in range(n_sketch):
            S = prob.sample(k, g)
            Lf = max(Lf, norm(lambda y: prob.loss(y, S), x))
            L = max(L, norm(prob.loss, prob.project(x, S)))  # f at P_S X
        draws = [prob.sample(k, g) for _ in range(mc)]
        Ls = max(Ls, norm(lambda y: sum(prob.loss(y, S) for S in draws) / mc, x))
    return L, Lf, Ls


def ratio_checks(name: str, r: int, rows: dict[int, tuple[float, ...]], rtol: float,
                 distort_L: float) -> list[Check]:
    checks = []
    for k, (L, Lf, Ls) in rows.items():
        q, L = r / k, L * distort_L
        # L is a max over the points P_S X too, where hess f~(X; S) = P_S hess f(P_S X) P_S:
        # every row holds by that measurement (at 8/8 both sides are one quantity, measured twice)
        checks += [Check(f"{name} k/r={k}/{r}: L_fixed <= (r/k) L", Lf, q * L, rtol=rtol,
                         construction=True),
                   Check(f"{name} k/r={k}/{r}: L_fixed <= (r/k)^2 L", Lf, q * q * L, rtol=rtol,
                         construction=True),
                   Check(f"{name} k/r={k}/{r}: L_sketch <= (r/k) L", Ls, q * L, rtol=rtol,
                         note=f"L_sketch / L = {Ls / L:.3g}", construction=True)]
    return checks


def mixed_checks(m: dict, distort_L: float) -> list[Check]:
    """Prop. D.4 for the global f^S (L_s <= L_bar) and (r/k_i) L for each client's fixed sketch."""
    label, L = f"lsq k_i={','.join(map(str, m['ranks']))}/8", m["L"] * distort_L
    checks = [Check(f"{label}: L_s (global f^S) <= L_bar", m["L_s"], m["L_bar"] * distort_L,
                    rtol=1e-3, note=f"L_s / L = {m['L_s'] / m['L']:.3g}, L_s / L_tilde = "
                                    f"{m['L_s'] / m['L_tilde']:.3g}", construction=True)]
    checks += [Check(f"{label}: client {i} L_fixed <= (r/k_i) L", f, L / q, rtol=1e-3,
                     construction=True)
               for i, (f, q) in enumerate(zip(m["fixed"], m["q"]))]
    return checks


def plot_mixed(ax, m: dict) -> None:
    """Each client's fixed-sketch smoothness against (r/k_i) L; the global f^S against L_bar,
    L_tilde and L (horizontal lines)."""
    x = np.arange(len(m["q"]))
    ax.semilogy(x, m["L"] / m["q"], "^-", color="C2", label="(r/k_i) L")
    ax.semilogy(x, m["fixed"], "o", color="C0", ms=8, label="measured: client's fixed sketch")
    for key, style, color, name in (("L_tilde", "--", "C3", "L_tilde = L mean (r/k_i)^2"),
                                    ("L_bar", "-.", "C1", "L_bar = L mean (r/k_i)"),
                                    ("L", ":", "gray", "L"),
                                    ("L_s", "-", "k", "measured: global f^S")):
        ax.axhline(m[key], ls=style, color=color, label=name)
    ax.set_xticks(x, [f"k={k}" for k in m["ranks"]])
    ax.set(xlabel="client (r = 8)", ylabel="smoothness (max ||hess||_2)",
           title="least squares, mixed k_i: the global f^S")
    ax.legend(fontsize=7)


def plot(results: dict[str, dict[int, tuple[float, ...]]], r: int, mixed: dict,
         folder: str) -> None:
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(5.5 * (len(results) + 1), 4.2))
    plot_mixed(axes[-1], mixed)
    for ax, (name, rows) in zip(axes, results.items()):
        q = np.array([r / k for k in rows])
        L, Lf, Ls = (np.array(v) for v in zip(*rows.values()))
        ax.loglog(q, q * q * L, "s--", color="C3", label="(r/k)^2 L (paper)")
        ax.loglog(q, q * L, "^-", color="C2", label="(r/k) L (via P_S)")
        ax.loglog(q, L, ":", color="gray", label="L")
        ax.loglog(q, Lf, "o", color="C0", ms=8, label="measured: fixed sketch f~(.; S)")
        ax.loglog(q, Ls, "x", color="C1", ms=9, mew=2, label="measured: expected f^S")
        ax.set_xticks(q, [f"{k}/{r}" for k in rows])
        ax.minorticks_off()
        ax.set(xlabel="sketching ratio k/r (log scale of r/k)", ylabel="smoothness (max ||hess||_2)",
               title=name)
        ax.legend(fontsize=8)
    fig.suptitle("Measured smoothness against the two fixed-sketch constants")
    save_figure(fig, folder, "smoothness.png")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--distort-L", type=float, default=1.0,
                        help="multiply the measured L by this before the checks (0.5 must FAIL)")
    args = parser.parse_args(argv)
    g = setup(args.seed)
    r, ks = 8, (1, 2, 4, 6, 8)
    rounds, iters, tsteps, tpoints, nsk, mc, titers = 200, 100, 30, 3, 4, 8, 40
    if args.quick:
        ks, rounds, iters, tsteps, tpoints, nsk, mc, titers = (2, 4, 8), 30, 40, 6, 1, 2, 3, 20
    print(f"seed {args.seed}; least squares float64, r={r}, FSLoRA {rounds} rounds, {iters} "
          f"power iterations; transformer float32, {tsteps} sketched SGD steps, {tpoints} points, "
          f"{nsk} sketches per point, M={mc}, {titers} power iterations")
    lsq = {k: lsq_smoothness(k, rounds, iters, g) for k in tqdm(ks, desc="least squares")}
    mixed = mixed_smoothness((1, 2, 4, 6), rounds, iters, g)
    tf = {k: transformer_smoothness(k, tsteps, tpoints, nsk, mc, titers, g)
          for k in tqdm(ks, desc="transformer")}
    checks = (ratio_checks("lsq", r, lsq, 1e-3, args.distort_L)
              + ratio_checks("transformer", r, tf, 0.05, args.distort_L)
              + mixed_checks(mixed, args.distort_L))
    for name, rows in (("least squares", lsq), ("tiny transformer", tf)):
        print(f"\n{name}: {'k/r':>6} {'L':>9} {'L_fixed':>9} {'L_sketch':>9} "
              f"{'fixed/((r/k)L)':>15} {'fixed/((r/k)^2 L)':>18} {'sketch/((r/k)L)':>16}")
        for k, (L, Lf, Ls) in rows.items():
            q = r / k
            print(f"{'':>15}{k}/{r:<4} {L:9.4g} {Lf:9.4g} {Ls:9.4g} {Lf / (q * L):15.3g} "
                  f"{Lf / (q * q * L):18.3g} {Ls / (q * L):16.3g}")
    print(f"\nleast squares, mixed k_i = {mixed['ranks']} of {r}: L {mixed['L']:.4g}; global f^S "
          f"measured L_s {mixed['L_s']:.4g}; L_bar {mixed['L_bar']:.4g} (L_s / L_bar "
          f"{mixed['L_s'] / mixed['L_bar']:.3g}); L_tilde {mixed['L_tilde']:.4g}; clients' fixed "
          f"sketch {np.array2string(mixed['fixed'], precision=4)} against (r/k_i) L "
          f"{np.array2string(mixed['L'] / mixed['q'], precision=4)}")
    print_checks("smoothness: measured against (r/k) L and (r/k)^2 L", checks)
    plot({"least squares (r = 8)": lsq, "tiny transformer (r = 8)": tf}, r, mixed, args.figures)
    return exit_code(checks)


if __name__ == "__main__":
    raise SystemExit(main())
