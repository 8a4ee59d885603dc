"""Sketch moments (Lemma D.3 and what follows from E[S^2] = (r/k) I; docs/method.md section 6).

    E[S] = I_r,  E[S^2] = (r/k) I_r,  E[B S A] = B A,
    ||M S||_F^2 <= (r/k)^2 ||M||_F^2  (every S),   E_S ||M S||_F^2 = (r/k) ||M||_F^2,
    E||B S A - B A||_F^2 = (r/k - 1) ( sum_j |b_j|^2 |a_j|^2
                                       - 1/(r-1) sum_{j != l} (b_j . b_l)(a_j . a_l) ).

Checked two ways: exactly, by averaging over all C(r, k) index sets for every 2 <= r <= r_max
(10) and 1 <= k <= r (the table shows the worst entry over all of them); and by Monte Carlo for
r = 64 with the library's sampler, where a check passes when the prediction lies within 4
standard errors of the sample mean (the printed interval is the 95% one, 1.96 standard errors).

    python -m theory.sketch_moments [--quick]
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fslora_min.sketch import sample_sketch  # noqa: E402
from theory.enumeration import all_sketch_diagonals  # noqa: E402
from theory.report import (Check, exit_code, print_checks, script_parser,  # noqa: E402
                           save_figure, setup)

Z_PASS = 4.0  # Monte Carlo: fail when |mean - prediction| > 4 standard errors


def second_moment(r: int, k: int) -> float:
    """E[S_jj^2] = (r/k)^2 P(j in I) = (r/k)^2 (k/r) = r/k: the diagonal of E[S^2] (Lemma D.3)."""
    return r / k


def sketch_variance(B: torch.Tensor, A: torch.Tensor, k: int) -> float:
    """E||B S A - B A||_F^2 = (r/k - 1)(sum_j |b_j|^2 |a_j|^2 - 1/(r-1) sum_{j!=l} (b_j.b_l)(a_j.a_l)).

    From E[(S_jj - 1)(S_ll - 1)] = r/k - 1 (j = l) and -(r/k - 1)/(r - 1) (j != l), which holds
    since P(j, l in I) = k(k-1) / (r(r-1)). B is (m, r) with columns b_j; A is (r, n), rows a_j.
    """
    r = B.shape[1]
    gram = (B.T @ B) * (A @ A.T)  # (r, r): (b_j . b_l)(a_j . a_l)
    diag = gram.diagonal().sum()
    return float((r / k - 1) * (diag - (gram.sum() - diag) / (r - 1)))


def moment_values(B: torch.Tensor, A: torch.Tensor, M: torch.Tensor, G: torch.Tensor,
                  d: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sketch quantities whose means the lemma predicts; d is (s, r), one diag(S) a row."""
    BSA = torch.einsum("mr,sr,rn->smn", B, d, A)  # (s, m, n)
    MS2 = ((M * d[:, None, :]) ** 2).sum((1, 2))  # (s,): ||M S||_F^2, M is (m, r)
    return {"S_jj": d, "S_jj^2": d**2, "BSA": BSA, "<G, BSA>": (BSA * G).sum((1, 2)),
            "||MS||^2": MS2, "||MS||^2 / ||M||^2": MS2 / (M**2).sum(),
            "||BSA - BA||^2": ((BSA - B @ A) ** 2).sum((1, 2))}


def predictions(B, A, M, G, r: int, k: int) -> dict[str, torch.Tensor | float]:
    return {"S_jj": torch.ones(r), "S_jj^2": torch.full((r,), second_moment(r, k)),
            "BSA": B @ A, "<G, BSA>": float((G * (B @ A)).sum()),
            "||MS||^2": r / k * float((M**2).sum()), "||MS||^2 / ||M||^2": (r / k) ** 2,
            "||BSA - BA||^2": sketch_variance(B, A, k)}


def random_factors(r: int, g: torch.Generator, m: int = 5, n: int = 4):
    """B (m, r), A (r, n) with correlated columns (so the j != l term matters), M (m, r), G (m, n)."""
    mix = torch.eye(r) + 0.5 * torch.randn(r, r, generator=g) / r**0.5
    return (torch.randn(m, r, generator=g) @ mix, mix.T @ torch.randn(r, n, generator=g),
            torch.randn(m, r, generator=g), torch.randn(m, n, generator=g))


def exact_checks(r_max: int, g: torch.Generator) -> tuple[list[Check], dict]:
    """Average over all index sets for each r <= r_max, k <= r; keep the worst entry per identity.

    An entry's error is measured against the scale of its identity at that r (the largest
    |prediction| over all k and entries), not against its own prediction: at k = r the variance
    is predicted to be 0 and measured as rounding residue (~1e-30), and err / |prediction| there
    would be 0/0-like noise that outranks every real error. The identity's check then compares
    measured with predicted at the worst entry with atol = 1e-10 x that scale.
    """
    worst: dict[str, tuple[float, float, float, float]] = {}  # name -> (rel, meas, pred, scale)
    curve = {}
    for r in range(2, r_max + 1):
        B, A, M, G = random_factors(r, g)
        per_k = []  # (name, measured (flat), predicted (flat)) for every k
        for k in range(1, r + 1):
            vals = moment_values(B, A, M, G, all_sketch_diagonals(r, k))
            pred = predictions(B, A, M, G, r, k)
            for name, v in vals.items():
                meas = v.max(0).values if name == "||MS||^2 / ||M||^2" else v.mean(0)
                per_k.append((name, meas.flatten(), torch.as_tensor(pred[name]).expand_as(meas)
                              .flatten()))
            if r == r_max:
                curve[k] = (float(vals["||BSA - BA||^2"].mean()), pred["||BSA - BA||^2"])
        scale = {}
        for name, _, p in per_k:
            scale[name] = max(scale.get(name, 0.0), float(p.abs().max()))
        for name, meas, p in per_k:
            if name == "||MS||^2 / ||M||^2":  # an inequality: keep the tightest case
                i, rel = 0, float(meas[0] / p[0])
            else:
                err = (meas - p).abs()
                i = int(err.argmax())
                rel = float(err[i]) / scale[name]
            if name not in worst or rel > worst[name][0]:
                worst[name] = (rel, float(meas[i]), float(p[i]), scale[name])
    checks = []
    for name, (_, meas, p, scale) in worst.items():
        rel = "<=" if name == "||MS||^2 / ||M||^2" else "=="
        label = f"exact r<={r_max}: {'max_S ' if rel == '<=' else 'E '}{name}"
        checks.append(Check(label, meas, p, rel, rtol=1e-10 if rel == "<=" else 0.0,
                            atol=1e-10 * scale if rel == "==" else 0.0,
                            note=f"worst over all r, k, entries; atol 1e-10 x scale {scale:.3g}"
                            if rel == "==" else ""))
    return checks, curve


def monte_carlo_checks(r: int, ks: list[int], samples: int,
                       g: torch.Generator) -> tuple[list[Check], dict]:
    """Sample `samples` sketches with fslora_min.sketch.sample_sketch for each k; z-test the means."""
    B, A, M, G = random_factors(r, g, m=8, n=8)
    checks, curve = [], {}
    for k in ks:
        d = torch.stack([sample_sketch(r, k, g).diagonal()
                         for _ in tqdm(range(samples), desc=f"MC r={r} k={k}", leave=False)])
        vals, pred = moment_values(B, A, M, G, d), predictions(B, A, M, G, r, k)
        for name in ("S_jj", "S_jj^2", "<G, BSA>", "||MS||^2", "||BSA - BA||^2"):
            v = vals[name][:, 0] if name.startswith("S_jj") else vals[name]  # j = 0 for S_jj
            p = pred[name] if not torch.is_tensor(pred[name]) else float(pred[name][0])
            mean, se = float(v.mean()), float(v.std() / samples**0.5)
            checks.append(Check(f"MC r={r} k={k}: E {name}", mean, p, "==", rtol=1e-12,
                                atol=Z_PASS * se, note=f"95% CI +-{1.96 * se:.3g}"))
            if name == "||BSA - BA||^2":
                curve[k] = (mean, 1.96 * se, p)
        worst = float(vals["||MS||^2 / ||M||^2"].max())
        checks.append(Check(f"MC r={r} k={k}: max_S ||MS||^2/||M||^2", worst, (r / k) ** 2, "<="))
    return checks, curve


def plot(exact: dict, r_max: int, mc: dict, r_mc: int, folder: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, data, r, title in ((axes[0], exact, r_max, f"exact: all index sets, r = {r_max}"),
                               (axes[1], mc, r_mc, f"Monte Carlo, r = {r_mc} (95% CI)")):
        ks = np.array(sorted(data))
        formula = [data[k][-1] for k in ks]
        ax.plot(ks / r, formula, "-", color="k", label="formula (r/k - 1)(...)")
        if len(data[ks[0]]) == 3:
            ax.errorbar(ks / r, [data[k][0] for k in ks], yerr=[data[k][1] for k in ks],
                        fmt="o", color="C1", capsize=4, label="measured")
        else:
            ax.plot(ks / r, [data[k][0] for k in ks], "o", color="C1", label="measured")
        ax.set(xlabel="sketching ratio k/r", ylabel="E ||B S A - B A||_F^2", title=title,
               yscale="symlog", ylim=(0, None))
        ax.legend()
    fig.suptitle("Sketch variance: exact formula against enumeration and sampling")
    save_figure(fig, folder, "sketch_moments.png")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--r-max", type=int, default=10, help="exact enumeration up to this r")
    parser.add_argument("--mc-rank", type=int, default=64, help="r for the Monte Carlo checks")
    parser.add_argument("--samples", type=int, default=20000, help="Monte Carlo samples per k")
    args = parser.parse_args(argv)
    if args.quick:
        args.r_max, args.samples = 6, 2000
    g = setup(args.seed)
    print(f"seed {args.seed}; float64; exact r <= {args.r_max}; MC r = {args.mc_rank}, "
          f"{args.samples} samples per k")
    exact, exact_curve = exact_checks(args.r_max, g)
    ks = [max(1, round(q * args.mc_rank)) for q in (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)]
    mc, mc_curve = monte_carlo_checks(args.mc_rank, ks, args.samples, g)
    print_checks("sketch moments: exact enumeration", exact)
    print_checks("sketch moments: Monte Carlo", mc)
    plot(exact_curve, args.r_max, mc_curve, args.mc_rank, args.figures)
    return exit_code(exact + mc)


if __name__ == "__main__":
    raise SystemExit(main())
