"""Tests of theory/: every script passes at --quick size, and its checks can fail.

The scripts set float64 as torch's default dtype and one thread (theory.report.setup); each
test puts the defaults back so the rest of the suite is unaffected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from theory import (bias_runs, bound, convergence, corollary, derived, drift, noise,
                    sketch_moments, sketch_noise, smoothness)
from theory.bound import (BoundConstants, L_bar, L_tilde, bound_terms, convergence_bound,
                          corollary_min_rounds, corollary_step, derived_bound,
                          derived_bound_terms, derived_max_step, derived_step_conditions,
                          max_step)
from theory.calibration import Effort, calibrate
from theory.constants import (fixed_sketch_constants, sketched_objective_smoothness,
                              smoothness_L)
from theory.enumeration import all_sketch_diagonals
from theory.hessian import hessian_norms
from theory.lsq_problem import LSQConfig, LSQProblem, project
from theory.report import Check, exit_code, setup
from theory.sketch_bias import predicted_fixed_point, sketch_penalty_weight


@pytest.fixture(autouse=True)
def restore_torch_defaults():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("script,png", [(sketch_moments, ["sketch_moments.png"]),
                                        (smoothness, ["smoothness.png"]),
                                        (convergence, ["convergence_ratios.png",
                                                       "convergence_sweeps.png"]),
                                        (drift, [])])
def test_script_passes_at_quick_size(script, png, tmp_path):
    assert script.main(["--quick", "--figures", str(tmp_path)]) == 0
    for name in png:
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.slow
def test_smoothness_check_fails_with_a_wrong_constant(tmp_path):
    """The measured (r/k) L is tight, so half of L must break 'L_fixed <= (r/k) L'."""
    assert smoothness.main(["--quick", "--figures", str(tmp_path), "--distort-L", "0.5"]) == 1


@pytest.fixture(scope="module")
def small_run():
    setup(0)
    problem = LSQProblem(LSQConfig(ranks=(4, 4, 4, 4)))
    effort = Effort(seeds=1, gd_steps=200, power_iters=30, keep_points=4, attempts=4)
    return calibrate(problem, 80, 2, effort, torch.Generator().manual_seed(0))


def test_convergence_bound_holds_and_fails_with_wrong_constants(small_run):
    assert all(c.ok for c in convergence.outcome_checks("run", small_run, 2, {}))
    # this run starts far from a stationary point: the gap term alone carries the bound, so only
    # the gap and L together, both / 100, put the bound below what FSLoRA does (the noise terms
    # are tested by test_noise_dominated_check_fails_when_sigma_g_is_divided_by_10)
    wrong = convergence.outcome_checks("run", small_run, 2, {"L": 0.01, "gap": 0.01})
    assert not all(c.ok for c in wrong)
    assert exit_code(wrong) == 1


@pytest.fixture(scope="module")
def noise_8_8():
    """noise.py's 8/8 setting at the tests' size: from a stationary X^0, batch 1, label noise."""
    g = setup(0)
    effort = Effort(seeds=1, gd_steps=800, power_iters=30, keep_points=60)
    return noise.noise_run((8, 8, 8, 8), True, 100, 60, 2, effort, 0, g, "8/8")


def test_noise_dominated_check_fails_when_sigma_g_is_divided_by_10(noise_8_8):
    """From a stationary X^0 with batch 1 and label noise, only the sigma_g terms are left: the
    check holds with the measured sigma_g^2 and fails with (sigma_g / 10)^2."""
    out = noise_8_8
    terms = bound_terms(out.constants, out.step, 60, 2)
    assert terms["gap"] < 1e-3 * sum(terms.values())  # noise-dominated: the gap term is ~0
    assert all(c.ok for c in convergence.outcome_checks("8/8", out, 2, {}))
    assert not all(c.ok for c in convergence.outcome_checks("8/8", out, 2, {"sigma_g2": 0.01}))


def test_dropping_the_L_tilde_sigma_g_term_passes_the_noise_dominated_check(noise_8_8,
                                                                            monkeypatch):
    """Issue 28's mutation 'drop 12 gamma L_tilde sigma_g^2 / N' is not caught by a measurement:
    the stationary floor is about gamma tr(hess Sigma_g) / (2N) <= gamma L sigma_g^2 / (2N), and
    6 gamma L_bar sigma_g^2 / N is left; at 8/8 the observed average reaches 0.04 of it."""
    out = noise_8_8
    terms = bound.bound_terms
    monkeypatch.setattr(bound, "bound_terms", lambda *a, **k: {
        n: v for n, v in terms(*a, **k).items() if n != "L_tilde sigma_g"})
    checks = convergence.outcome_checks("8/8", out, 2, {})
    assert all(c.ok for c in checks)
    assert 0.01 < max(c.ratio for c in checks[1:]) < 0.1


def test_calibrated_step_meets_the_condition(small_run):
    assert small_run.step <= max_step(small_run.constants, 2) * (1 + 1e-12)
    assert small_run.constants.gap > 0 and small_run.constants.L > 0


def test_bound_formulas():
    c = BoundConstants(L=2.0, sigma_g2=1.0, sigma_s2=0.5, c_h=1.0, sigma_h2=0.1, gap=3.0,
                       ratios=(0.25, 0.5, 1.0, 1.0))
    assert L_bar(c) == pytest.approx(2.0 * (4 + 2 + 1 + 1) / 4)
    assert L_tilde(c) == pytest.approx(2.0 * (16 + 4 + 1 + 1) / 4)
    H, T = 3, 100
    gamma = max_step(c, H)
    assert gamma == pytest.approx(min(1 / (6 * H * math.sqrt(2 * L_tilde(c) * 2.0)),
                                      1 / (4 * H**2 * 2.0)))
    expect = (4 * 3.0 / (gamma * T * H) + 6 * gamma * L_bar(c) / 4 * 1.5
              + 12 * gamma * L_tilde(c) / 4 * (1.5 + 0.3))
    assert convergence_bound(c, gamma, T, H) == pytest.approx(expect)
    assert convergence_bound(c, gamma, T, H, sharp=True) < convergence_bound(c, gamma, T, H)
    assert max_step(c, H, sharp=True) >= gamma
    T0 = corollary_min_rounds(c, H)
    assert corollary_step(c, T0, H) <= max_step(c, H) * (1 + 1e-12)
    assert corollary_step(c, T0 - 1, H) > max_step(c, H)
    with pytest.raises(ValueError):
        BoundConstants(-1.0, 0, 0, 0, 0, 0, (0.5,))


def test_each_term_of_the_step_condition_binds_somewhere():
    """gamma_max = min{1 / (6 H sqrt((c_h + 1) L_tilde L)), 1 / (N H^2 L)} on fresh constants:
    with c_h = 0 and k = r the first is 1 / (6 H L), so N H > 6 makes the second bind."""
    g = np.random.default_rng(0)
    for N, H, binding in ((2, 1, "first"), (4, 2, "second"), (8, 3, "second"), (3, 4, "second")):
        L, c_h = g.uniform(0.5, 5), 0.0
        c = BoundConstants(L=L, sigma_g2=1.0, sigma_s2=0.0, c_h=c_h, sigma_h2=0.0, gap=1.0,
                           ratios=(1.0,) * N)
        first, second = 1 / (6 * H * math.sqrt((c_h + 1) * L * L)), 1 / (N * H**2 * L)
        assert (first < second) == (binding == "first")
        assert max_step(c, H) == pytest.approx(min(first, second), rel=1e-12)
        # and at mixed ratios, where L_tilde != L: the first term with L_tilde
        q = tuple(g.choice([0.125, 0.25, 0.5, 1.0], N))
        c = BoundConstants(L, 1.0, 0.5, 2.0, 0.1, 1.0, q)
        lt = L * float(np.mean([1 / x**2 for x in q]))
        expect = min(1 / (6 * H * math.sqrt(3 * lt * L)), 1 / (N * H**2 * L))
        assert max_step(c, H) == pytest.approx(expect, rel=1e-12)


def test_exact_variance_row_fails_without_the_cross_term(monkeypatch):
    """The script's exact-enumeration row must catch a wrong formula: drop the j != l term."""
    setup(0)
    checks, _ = sketch_moments.exact_checks(5, torch.Generator().manual_seed(0))
    assert all(c.ok for c in checks)

    def no_cross_term(B, A, k):
        gram = (B.T @ B) * (A @ A.T)
        return float((B.shape[1] / k - 1) * gram.diagonal().sum())

    monkeypatch.setattr(sketch_moments, "sketch_variance", no_cross_term)
    checks, _ = sketch_moments.exact_checks(5, torch.Generator().manual_seed(0))
    assert not next(c for c in checks if "||BSA - BA||^2" in c.name).ok
    # rounding residue at k = r (predicted 0, measured ~1e-30 on some BLAS builds) must not
    # become the "worst" entry and hide the wrong formula
    values = sketch_moments.moment_values

    def with_residue(*args):
        out = values(*args)
        out["||BSA - BA||^2"] = out["||BSA - BA||^2"] + 5e-30
        return out

    monkeypatch.setattr(sketch_moments, "moment_values", with_residue)
    checks, _ = sketch_moments.exact_checks(5, torch.Generator().manual_seed(0))
    assert not next(c for c in checks if "||BSA - BA||^2" in c.name).ok


def test_sketch_variance_formula_and_a_wrong_one():
    setup(0)
    g = torch.Generator().manual_seed(1)
    B, A, M, G = sketch_moments.random_factors(7, g)
    d = all_sketch_diagonals(7, 3)
    exact = float(sketch_moments.moment_values(B, A, M, G, d)["||BSA - BA||^2"].mean())
    formula = sketch_moments.sketch_variance(B, A, 3)
    assert Check("var", exact, formula, "==", rtol=1e-10).ok
    assert not Check("var", exact, 0.9 * formula, "==", rtol=1e-10).ok


def test_lsq_identities_and_power_iteration_against_dense_eigenvalues():
    setup(0)
    problem = LSQProblem(LSQConfig(ranks=(2, 4, 8)))
    g = torch.Generator().manual_seed(0)
    x = problem.x0 + 0.3 * torch.randn(problem.x0.shape, generator=g)
    m, n, r = problem.dims
    d = problem.D[1, 5]
    Z, Y = problem.Z[1], problem.Y[1]
    # f~_i(X; S) = f_i(P_S X)
    assert torch.allclose(problem.loss(x, Z, Y, d), problem.loss(project(x, d, m, n, r), Z, Y,
                                                                 torch.ones(r)))
    # the exact sketched gradient is autograd's gradient of the exact sketched loss
    y = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(problem.sketched_loss(y), y)
    assert torch.allclose(auto, problem.sketched_grad(x), atol=1e-12)
    # power iteration on HVPs reaches the largest |eigenvalue| of the dense Hessian
    dense = torch.autograd.functional.hessian(lambda v: problem.loss(v, Z, Y, d), x)
    top = float(torch.linalg.eigvalsh(dense).abs().max())
    est = float(hessian_norms(lambda v: problem.loss(v, Z, Y, d), x[None], 300, g)[0])
    assert est <= top * (1 + 1e-9) and est == pytest.approx(top, rel=1e-4)


def test_same_seed_same_numbers():
    from theory.fslora_iteration import RunConfig, run_fslora

    setup(0)
    problem = LSQProblem(LSQConfig())
    a = run_fslora(problem, RunConfig(rounds=5, local_steps=2, step=0.01, seed=3))
    b = run_fslora(problem, RunConfig(rounds=5, local_steps=2, step=0.01, seed=3))
    assert np.array_equal(a.grad_sq, b.grad_sq)


def test_sketched_objective_minimum_matches_gradient_descent_on_the_exact_objective():
    """The closed form of theory/sketch_bias.py against GD on f^S averaged over ALL index sets
    (no use of the variance formula), at mixed ratios. f^S is flat near its minimiser, so its
    value converges long before the point: F there is checked to 1%."""
    setup(0)
    spectrum, ranks = (1.0, 0.6, 0.3), (1, 3)
    fs, plain = bias_runs.sketched_gd_minimum(ranks, spectrum, 5, 1500, 0.3)
    pred = predicted_fixed_point("fslora", spectrum, 5, ranks)
    assert fs == pytest.approx(pred.objective_excess, rel=1e-5)
    assert plain == pytest.approx(pred.excess_loss, rel=1e-2)
    assert pred.excess_loss > predicted_fixed_point("fedavg-full", spectrum, 5, ranks).excess_loss


def test_fixed_points_of_the_baselines_match_their_runs():
    for method, lr in (("fedavg-min", 0.05), ("flexlora", 0.1), ("flora", 0.05)):
        cfg = bias_runs.SimConfig(client_ranks=(1, 2, 4, 6), rounds=300, lr=lr)
        obs = bias_runs.observed_fixed_point(bias_runs.simulate(method, cfg))
        pred = predicted_fixed_point(method, cfg.spectrum, cfg.rank, cfg.client_ranks, lr=cfg.lr,
                                     local_steps=cfg.local_steps, alpha=cfg.alpha)
        assert obs == pytest.approx(pred.excess_loss, rel=1e-3, abs=1e-6), method
    # FlexLoRA run to local convergence keeps pi_l sigma_l; at H = 1 the shared-by-few
    # components die out: the two limits differ, and the finite-H one is what the run shows
    inf = predicted_fixed_point("flexlora", cfg.spectrum, cfg.rank, cfg.client_ranks)
    mu = inf.singular_values
    assert mu == pytest.approx([1.0, 0.75 * 0.8, 0.5 * 0.6, 0.5 * 0.4, 0.25 * 0.2])


def test_sketch_bias_formulas():
    assert sketch_penalty_weight(8, (8, 8)) == 0.0
    assert sketch_penalty_weight(8, (2, 4)) == pytest.approx(np.mean([6 / 14, 4 / 28]))
    sigma = np.array([1.0, 0.5])
    # rank one: no penalty, nothing lost; k = r: rank-r LoRA
    assert predicted_fixed_point("fslora", (1.0,), 8, (1,)).excess_loss == pytest.approx(0.0)
    assert predicted_fixed_point("fslora", sigma, 4, (4,)).excess_loss == pytest.approx(0.0)
    kappa = sketch_penalty_weight(4, (2,))
    mu = predicted_fixed_point("fslora", sigma, 4, (2,)).singular_values
    # stationarity of g on its support: (1 - kappa) mu_l - sigma_l + kappa sum(mu) = 0
    assert ((1 - kappa) * mu - sigma + kappa * mu.sum()) == pytest.approx([0, 0], abs=1e-12)
    with pytest.raises(ValueError, match="client_ranks"):
        predicted_fixed_point("fslora", sigma, 4, (5,))
    with pytest.raises(ValueError, match="method"):
        predicted_fixed_point("lora", sigma, 4, (2,))


def test_a_bad_distort_names_the_flag():
    with pytest.raises(SystemExit, match="--distort 'sigma=0.1'"):
        convergence.parse_distort(["sigma=0.1"])
    with pytest.raises(SystemExit, match="--distort 'L=x'"):
        convergence.parse_distort(["L=x"])
    assert convergence.parse_distort(["sigma_g2=0.01", "L=2"]) == {"sigma_g2": 0.01, "L": 2.0}


def derived_conditions_by_hand(L: float, c_h: float, ratios, H: int,
                               L_s: float | None = None) -> list[float]:
    """C1-C3 of theory/README.md's derived theorem, from L_i = (r / k_i) L (L_s: L_bar if None)."""
    Li = L / np.asarray(ratios)
    L_s = Li.mean() if L_s is None else L_s
    return [1 / (3 * H * L_s), 1 / (math.sqrt(18) * H * Li.max()),
            math.sqrt(5 / 48) / (H * math.sqrt((c_h + 1) * (Li**2).mean()))]


def test_derived_step_condition_from_independently_measured_constants():
    """L and every fixed-sketch smoothness measured with dense Hessian eigenvalues (not the
    code's power iteration) at points X and P_S X: the fixed-sketch constants stay below
    (r/k_i) L, which the derived step conditions use, and the code computes C1-C3 from them."""
    setup(0)
    problem = LSQProblem(LSQConfig(r=4, ranks=(1, 2, 4)))
    g = torch.Generator().manual_seed(0)
    m, n, r = problem.dims
    pts = problem.x0 + 0.3 * torch.randn((2, problem.x0.numel()), generator=g)
    dense = lambda f, x: float(torch.linalg.eigvalsh(
        torch.autograd.functional.hessian(f, x)).abs().max())
    L, L_plain, fixed, L_s = 0.0, 0.0, np.zeros(problem.N), 0.0
    for x in pts:
        L_s = max(L_s, dense(problem.sketched_loss, x))
        for i in range(problem.N):
            f_i = lambda v, d=torch.ones(r): problem.loss(v, problem.Z[i], problem.Y[i], d)
            L_plain = max(L_plain, dense(f_i, x))
            for d in problem.D[i][problem.w[i] > 0]:
                L = max(L, dense(f_i, project(x, d, m, n, r)))
                fixed[i] = max(fixed[i], dense(lambda v: f_i(v, d), x))
    L = max(L, L_plain)
    q = np.asarray(problem.ratios)
    assert np.all(fixed <= L / q * (1 + 1e-9))  # the sharper constant (r / k_i) L
    assert fixed[0] > L_plain  # at k = 1 the fixed sketch is rougher than f_i at X alone
    assert smoothness_L(problem, pts, 300, g) == pytest.approx(L, rel=1e-4)
    assert smoothness_L(problem, pts, 300, g, sketched=False) == pytest.approx(L_plain, rel=1e-4)
    assert fixed_sketch_constants(problem, pts, 300, g) == pytest.approx(fixed, rel=1e-4)
    assert sketched_objective_smoothness(problem, pts, 300, g) == pytest.approx(L_s, rel=1e-4)
    assert L_s <= L * np.mean(1 / q)  # Prop. D.4: f^S is L_bar-smooth
    H, c_h = 3, 1.5
    c = BoundConstants(L=L, sigma_g2=1.0, sigma_s2=0.5, c_h=c_h, sigma_h2=0.1, gap=1.0,
                       ratios=tuple(q), L_s=L_s)
    expect = derived_conditions_by_hand(L, c_h, q, H, L_s)
    assert list(derived_step_conditions(c, H).values()) == pytest.approx(expect, rel=1e-12)
    assert derived_max_step(c, H) == pytest.approx(min(expect), rel=1e-12)


def test_each_derived_step_condition_binds_or_is_implied():
    """On fresh constants: the derived gamma_max is min(C1, C2, C3) by hand; C1 is implied by C3
    (L_s <= L_bar <= sqrt(L L_tilde) and 3 < sqrt(48/5)); C2 = 1/(sqrt(18) H (r/k_min) L) binds
    when one client has a much smaller ratio than the rest (so the paper's L in its place fails
    here), and at equal ratios when c_h < 7/8; C3 binds at equal ratios when c_h > 7/8."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        N, H, L, c_h = int(rng.integers(1, 9)), int(rng.integers(1, 5)), rng.uniform(0.5, 5), \
            rng.uniform(0, 4)
        q = tuple(rng.choice([0.125, 0.25, 0.5, 0.75, 1.0], N))
        c = BoundConstants(L, 1.0, 0.5, c_h, 0.1, 1.0, q)
        c1, c2, c3 = derived_conditions_by_hand(L, c_h, q, H)
        assert derived_max_step(c, H) == pytest.approx(min(c1, c2, c3), rel=1e-12)
        assert c1 >= c3
    L, H, q = rng.uniform(0.5, 5), 2, (0.125,) + (1.0,) * 15
    c = BoundConstants(L, 1.0, 0.5, 0.0, 0.1, 1.0, q)
    c1, c2, c3 = derived_conditions_by_hand(L, 0.0, q, H)
    assert c2 < c3 and derived_max_step(c, H) == pytest.approx(c2, rel=1e-12)
    for c_h, binding in ((0.0, 1), (2.0, 2)):
        c = BoundConstants(L, 1.0, 0.5, c_h, 0.1, 1.0, (0.5,) * 4)
        expect = derived_conditions_by_hand(L, c_h, c.ratios, H)
        assert int(np.argmin(expect)) == binding
        assert derived_max_step(c, H) == pytest.approx(expect[binding], rel=1e-12)


def test_derived_bound_implies_theorem_4_4_under_its_second_condition():
    """README.md step (10): with H = 1 (one local step: the sketch-noise terms agree) and gamma
    under both the derived conditions and 1/(N H^2 L), the derived bound (L_s = L_bar) is at most
    Theorem 4.4's, term family by term family; a drift coefficient 10x too large breaks it."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        N = int(rng.integers(1, 9))
        c = BoundConstants(rng.uniform(0.5, 5), *rng.uniform(0, 2, 3), 0.1, rng.uniform(0, 3),
                           tuple(rng.choice([0.125, 0.25, 0.5, 1.0], N)))
        gamma = min(derived_max_step(c, 1), 1 / (N * c.L)) * rng.uniform(0.1, 1)
        ours, paper = derived_bound_terms(c, gamma, 50, 1), bound_terms(c, gamma, 50, 1)
        drift = sum(v for k, v in ours.items() if k.startswith("drift"))
        assert drift <= sum(v for k, v in paper.items() if k.startswith("L_tilde"))
        assert ours["gap"] == pytest.approx(paper["gap"])
        assert derived_bound(c, gamma, 50, 1) <= convergence_bound(c, gamma, 50, 1)
    c = BoundConstants(1.0, 1.0, 0.0, 0.0, 0.0, 0.0, (1.0,))  # only sigma_g: drift 12/5 vs 12
    gamma = 1 / 1.0
    drift = derived_bound_terms(c, gamma, 1, 1)["drift sigma_g"]
    assert drift <= bound_terms(c, gamma, 1, 1)["L_tilde sigma_g"] < 10 * drift


def test_derived_theorem_holds_at_its_step_and_fails_with_wrong_constants(monkeypatch):
    g = setup(0)
    problem = LSQProblem(LSQConfig(ranks=(1, 2, 4, 6)))
    effort = Effort(seeds=1, gd_steps=200, power_iters=30, keep_points=4, attempts=4,
                    measure_L_s=True)
    out = calibrate(problem, 60, 2, effort, g, step_rule=derived_max_step)
    assert out.step <= derived_max_step(out.constants, 2) * (1 + 1e-12)
    assert out.step > max_step(out.constants, 2)  # C3 is 1.9x Theorem 4.4's first condition
    assert all(c.ok for c in derived.derived_checks("run", out, 2, {}))
    # gap-dominated: only the gap / 1000 with L / 100 breaks the bound
    assert not all(c.ok for c in derived.derived_checks("run", out, 2, {"L": 0.01, "gap": 1e-3}))
    # Prop. D.4 for the measured f^S: 10 x L_s exceeds L_bar
    assert not derived.derived_checks("run", out, 2, {"L_s": 10.0})[-1].ok
    # the drift step: mean_i L_i^2 exceeds L L_bar, so the L_bar variant does not follow; with
    # the paper's plain L for each client's fixed sketch it would not, and the check fails
    drift, _ = derived.drift_step_checks("run", problem, out, 2, 30, g)
    assert all(c.ok for c in drift)
    with monkeypatch.context() as m:
        m.setattr(derived, "fixed_sketch_constants",
                  lambda problem, *a: np.full(problem.N, out.constants.L))
        drift, _ = derived.drift_step_checks("run", problem, out, 2, 30, g)
        assert not drift[1].ok
    # mutations of the constants, each caught by the measured fixed-sketch smoothness:
    # C2 with the paper's plain L (in place of max_i (r/k_i) L), and L_tilde = L
    with monkeypatch.context() as m:
        m.setattr(bound, "fixed_sketch_smoothness",
                  lambda c: np.full(c.N, c.L))
        drift, _ = derived.drift_step_checks("run", problem, out, 2, 30, g)
        assert not drift[0].ok and "C2" in drift[0].name
    with monkeypatch.context() as m:
        m.setattr(derived, "L_tilde", lambda c: c.L)
        drift, _ = derived.drift_step_checks("run", problem, out, 2, 30, g)
        assert not drift[2].ok and "L L_tilde" in drift[2].name


def test_corollary_rate_over_N_and_H_and_without_its_N(monkeypatch):
    """The bound at gamma_T = sqrt(N/(T H L_tilde)) is C / sqrt(T H N) for every N, H, T, and
    gamma_T meets the condition from T_min on; a step without its N breaks the rate."""
    rng = np.random.default_rng(2)
    cases = []
    for N in (2, 4, 8):
        for H in (1, 2, 4):
            c = BoundConstants(rng.uniform(0.5, 5), *rng.uniform(0, 2, 3), 0.1, 1.0,
                               tuple(rng.choice([0.25, 0.5, 1.0], N)))
            T0 = corollary_min_rounds(c, H)
            assert corollary_step(c, T0, H) <= max_step(c, H) * (1 + 1e-12)
            assert corollary_step(c, max(T0 - 1, 1), H) > max_step(c, H) or T0 == 1
            cases.append((c, T0, H))
    assert all(ch.ok for c, T, H in cases for ch in corollary.rate_checks("r", c, T, H))
    monkeypatch.setattr(corollary, "corollary_step",
                        lambda c, T, H: math.sqrt(1 / (T * H * L_tilde(c))))
    assert not all(ch.ok for c, T, H in cases for ch in corollary.rate_checks("r", c, T, H))


def test_corollary_run_checks_hold_and_fail_with_wrong_constants(small_run):
    problem = LSQProblem(LSQConfig(ranks=(4, 4, 4, 4)))
    effort = Effort(seeds=1, gd_steps=200, power_iters=30, keep_points=4)
    g = torch.Generator().manual_seed(0)
    checks, row = corollary.run_point(problem, small_run, 40, 2, small_run.step, effort, g, {},
                                      "run")
    assert all(c.ok for c in checks) and row["observed"] > 0
    checks, _ = corollary.run_point(problem, small_run, 40, 2, small_run.step, effort, g,
                                    {"L": 0.01, "gap": 0.01}, "run")
    assert not all(c.ok for c in checks)


def test_global_sketched_objective_at_mixed_ratios():
    """smoothness.py's mixed row: f^S within L_bar (Prop. D.4), each fixed sketch within
    (r/k_i) L; L_bar / 10 breaks the first, L / 2 the tight client."""
    g = setup(0)
    m = smoothness.mixed_smoothness((1, 2, 4, 6), 10, 60, g)
    assert all(c.ok for c in smoothness.mixed_checks(m, 1.0))
    assert not smoothness.mixed_checks(m, 0.1)[0].ok
    assert not all(c.ok for c in smoothness.mixed_checks(m, 0.5)[1:])
    assert m["L_s"] < m["L_bar"] < m["L_tilde"]


def test_step_10_needs_C2_which_theorem_4_4_does_not_imply():
    """README.md step (10): Theorem 4.4's conditions imply C3 and C1, not C2 at mixed ratios
    (the two cases of issue 28, in units of 1 / L)."""
    for ratios, H, thm, c2 in (((1 / 8, 1 / 4, 1 / 2, 3 / 4), 2, 0.0180, 0.0147),
                               ((1 / 8, 1.0, 1.0, 1.0), 1, 0.0407, 0.0295)):
        c = BoundConstants(L=1.0, sigma_g2=1.0, sigma_s2=1.0, c_h=0.0, sigma_h2=0.0, gap=1.0,
                           ratios=ratios)
        cond = derived_step_conditions(c, H)
        assert max_step(c, H) == pytest.approx(thm, abs=1e-4)
        assert cond["C2 1/(sqrt(18) H L_max)"] == pytest.approx(c2, abs=1e-4)
        assert cond["C3 sqrt(5/48)/(H sqrt((c_h+1) L L_tilde))"] > max_step(c, H)
        assert bound.step_10_max_step(c, H) == pytest.approx(c2, abs=1e-4)


def test_sketch_bias_returns_the_best_minimiser_at_ties():
    """kappa_bar = 1 (every client at k = 1): f^S is flat along splits of the tied top values;
    the equal split has the same f^S and the smallest excess F."""
    spectrum = (1.0, 1.0, 0.5)
    kappa = sketch_penalty_weight(8, (1,) * 4)
    assert kappa == pytest.approx(1.0)
    fp = predicted_fixed_point("fslora", spectrum, 8, (1,) * 4)
    assert fp.singular_values == pytest.approx([0.5, 0.5, 0.0])
    sigma = np.array(spectrum)
    one = np.array([1.0, 0.0, 0.0])
    from theory.sketch_bias import sketched_objective
    assert fp.objective_excess == pytest.approx(sketched_objective(one, sigma, kappa))
    assert fp.excess_loss == pytest.approx(0.375) and 0.5 * ((one - sigma) ** 2).sum() == 0.625


def test_checks_that_hold_by_construction_say_so(capsys):
    from theory.report import print_checks
    print_checks("t", [Check("a", 1.0, 1.0, construction=True), Check("b", 0.5, 1.0)])
    out = capsys.readouterr().out
    rows = out.splitlines()[3:5]
    assert "[by construction]" in rows[0] and "[by construction]" not in rows[1]
    assert exit_code([Check("a", 1.0, 1.0, construction=True)]) == 0


def test_sketch_noise_closed_forms_against_autograd_over_every_sketch():
    """The sweep's numpy FSLoRA: grad f^S in closed form (E_S[S M S] = Q o M) against autograd
    on f^S averaged over every index set, and one round of compact steps against autograd
    steps on F(W0 + s B S A), float64."""
    setup(0)
    problem = sketch_noise.sketch_noise_problem()
    q = sketch_noise.Quadratic.of(problem)
    g = torch.Generator().manual_seed(0)
    x = problem.x0 + 0.3 * torch.randn(problem.x0.shape, generator=g)
    B, A = q.split(x.numpy())
    gB, gA = q.sketched_grad(B, A)
    assert np.concatenate([gB.ravel(), gA.ravel()]) == pytest.approx(
        problem.sketched_grad(x).numpy(), abs=1e-13)
    idx = np.array([[0, 1, 2, 3, 5, 7], [1, 2, 3, 4, 5, 6]])  # (N, k)
    B1, A1 = sketch_noise.fslora_round(q, B, A, idx, 0.05, 3)
    m, n, r = problem.dims
    ends = []
    for i, I in enumerate(idx):
        d = torch.zeros(r)
        d[I] = r / len(I)
        y = x.clone()
        for _ in range(3):
            y = y.requires_grad_(True)
            (gr,) = torch.autograd.grad(problem.loss(y, problem.Z[i], problem.Y[i], d), y)
            y = (y - 0.05 * gr).detach()
        ends.append(y)
    ref = torch.stack(ends).mean(0).numpy()
    assert np.concatenate([B1.ravel(), A1.ravel()]) == pytest.approx(ref, abs=1e-13)


def test_linear_model_of_the_sketch_noise_floor():
    """The linear model's long-run mean is its exact stationary floor, which is
    gamma H tr(hess Sigma_s) / (2N) to first order in gamma H, and grows like H."""
    setup(0)
    problem = sketch_noise.sketch_noise_problem()
    x = sketch_noise.sketched_minimiser(problem)
    assert float(problem.sketched_grad(x).pow(2).sum()) < 1e-25
    hess, noise = sketch_noise.sketch_noise_moments(problem, x)
    floor = sketch_noise.linearised_floor(hess, noise, 1e-6, 10, 2)
    assert sketch_noise.linearised_floor(hess, noise, 1e-6, 1000, 2) == pytest.approx(100 * floor)
    late = sketch_noise.linear_model_average(hess, noise, 1e-6, 10, 2, 10**9, 10**9 + 10)
    assert late == pytest.approx(floor, rel=1e-4)
    early = sketch_noise.linear_model_average(hess, noise, 1e-6, 10, 2, 0, 100)
    assert early < 0.01 * floor


def test_client_drift_fails_theorem_4_4_at_the_second_condition_without_its_H(monkeypatch):
    """theory/drift.py's sigma_h regime: the checks hold at both theorems' steps; with 1/(N H L)
    in place of 1/(N H^2 L) the step grows to the first condition and the drift of H = 1000
    local steps puts ||grad f||^2 above Theorem 4.4's bound (1.6x at T = 200)."""
    checks, _ = drift.sigma_h_regime(1000, 200)
    assert all(c.ok for c in checks)
    conditions = bound.step_conditions

    def without_an_H(c, H, sharp=False):
        return {**conditions(c, H, sharp), "1/(N H^2 L)": 1 / (c.N * H * c.L)}

    monkeypatch.setattr(bound, "step_conditions", without_an_H)
    failed = [c for c in drift.sigma_h_regime(1000, 200)[0] if not c.ok]
    assert [c.name for c in failed] == ["sigma_h, Thm 4.4: avg ||grad f^S||^2 <= bound (L_tilde)"]
    assert failed[0].ratio > 1.3


def test_wrong_constants_the_drift_regimes_cannot_catch(monkeypatch):
    """Issue 28's mutations that no measurement here catches, with the margins
    theory/README.md states: the derived sigma_h drift term / 10 (the term is ~70x above the
    drift, so observed / bound goes from 0.014 to 0.14), and C3 with sqrt(5/12) (2x the step:
    observed / bound 0.28 -> 0.33; the bound fails only from ~7x the step, past C2 too)."""
    terms = bound.derived_bound_terms
    with monkeypatch.context() as m:
        m.setattr(bound, "derived_bound_terms", lambda *a: {
            n: v / 10 if n == "drift sigma_h" else v for n, v in terms(*a).items()})
        checks, _ = drift.sigma_h_regime(1000, 200)
        derived_check = next(c for c in checks if c.name.endswith("<= derived bound"))
        assert derived_check.ok and 0.1 < derived_check.ratio < 0.2
    checks, _ = drift.c_h_regime(10, 200)
    assert all(c.ok for c in checks) and 0.25 < checks[1].ratio < 0.3
    conditions = bound.derived_step_conditions
    c3 = "C3 sqrt(5/48)/(H sqrt((c_h+1) L L_tilde))"
    with monkeypatch.context() as m:
        m.setattr(bound, "derived_step_conditions",
                  lambda c, H: {**conditions(c, H), c3: 2 * conditions(c, H)[c3]})
        checks, _ = drift.c_h_regime(10, 200)
        assert all(c.ok for c in checks) and 0.3 < checks[1].ratio < 0.4
    step = bound.derived_max_step(drift.structure(drift.C_H, 16.0), 10)
    assert drift.tightest(drift.outcome(drift.C_H, 1.0, 7 * step, 10, 200, None), 10) > 1


@pytest.fixture(scope="module")
def sketch_noise_sweep():
    """A short sweep at H = 4 and a stationary run at H = 64, at 0.3 of Theorem 4.4's step at
    H = 64 (so the drift terms, ~ gamma^2, are small beside the sketch-noise term, ~ gamma)."""
    setup(0)
    sweep = sketch_noise.Sweep(Hs=(4,), steps=6000, rounds=1500, seeds=16, long_H=64,
                               long_rounds=1500, restated_up_to=64, margin=0.3)
    return sketch_noise.results(sweep, 0, torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_sketch_noise_floor_matches_the_linear_model_and_wrong_constants_fail(
        sketch_noise_sweep, monkeypatch):
    """Below the crossing (H = 64 < H* ~ 120) everything holds; dividing every noise constant by
    10, or dropping the derived sketch-noise term's extra H, fails a measured check."""
    res = sketch_noise.add_bounds(sketch_noise_sweep)
    assert all(c.ok for c in sketch_noise.checks(res, sketch_noise.RTOL))
    long = res["rows"][-1]
    assert long["late_mean"] > 0.3 * long["restated_sketch_terms"]  # the term is tight here
    terms, derived_terms = bound.bound_terms, bound.derived_bound_terms
    with monkeypatch.context() as m:  # every noise constant / 10
        m.setattr(bound, "bound_terms", lambda *a, **k: {
            n: v if n == "gap" else v / 10 for n, v in terms(*a, **k).items()})
        m.setattr(sketch_noise, "bound_terms", bound.bound_terms)
        assert not all(c.ok for c in sketch_noise.checks(sketch_noise.add_bounds(res), sketch_noise.RTOL))
    with monkeypatch.context() as m:  # the sketch-noise term without its extra H
        m.setattr(bound, "derived_bound_terms", lambda c, gamma, T, H: {
            n: v / H if n == "L_s sigma_s" else v for n, v in derived_terms(c, gamma, T, H).items()})
        assert not all(c.ok for c in sketch_noise.checks(sketch_noise.add_bounds(res), sketch_noise.RTOL))
    assert all(c.ok for c in sketch_noise.checks(sketch_noise.add_bounds(res), sketch_noise.RTOL))


def test_derived_bound_terms_are_step_9_exactly():
    """Step (9) of README.md's derivation, written out: each derived term equals it, so a
    coefficient / 10 or a dropped H fails here (a formula test; the measured checks that catch
    the dropped H are in test_sketch_noise_floor_matches_the_linear_model_and_wrong_constants_fail)."""
    rng = np.random.default_rng(3)
    for _ in range(10):
        N, H, gamma, T = int(rng.integers(1, 6)), int(rng.integers(1, 9)), rng.uniform(1e-4, 1e-2), 7
        c = BoundConstants(rng.uniform(0.5, 3), *rng.uniform(0.1, 2, 3), rng.uniform(0.1, 1),
                           rng.uniform(0, 2), tuple(rng.choice([0.25, 0.5, 1.0], N)),
                           L_s=rng.uniform(0.1, 2))
        ll = c.L * L_tilde(c)
        drift = 12 / 5 * gamma**2 * H * ll  # (gamma H / 2) (6/5) gamma^2 H L L_tilde / (gamma H / 4)
        expect = {"gap": 4 * c.gap / (gamma * T * H),
                  "L_s sigma_g": 6 * gamma * c.L_s * c.sigma_g2 / N,
                  "L_s sigma_s": 6 * gamma * H * c.L_s * c.sigma_s2 / N,
                  "drift sigma_g": drift * c.sigma_g2,
                  "drift sigma_s": drift * 2 * H * c.sigma_s2,
                  "drift sigma_h": drift * 4 * H * c.sigma_h2}
        got = derived_bound_terms(c, gamma, T, H)
        assert {k: float(v) for k, v in got.items()} == pytest.approx(expect, rel=1e-12)


def test_sketch_noise_readmes_match_the_committed_sweep():
    """theory/README.md and docs/method.md carry what `python -m theory.sketch_noise --readme`
    writes from theory/results/sketch_noise.json, and the sweep says the restated Theorem 4.4
    is crossed while the derived bound holds."""
    import json

    from theory.report import block_pattern

    with open(sketch_noise.RESULTS) as f:
        res = json.load(f)
    for path in sketch_noise.READMES:
        with open(path) as f:
            found = block_pattern("sketch_noise").search(f.read())
        assert found, f"{path} has no theory:sketch_noise block"
        assert found.group(2) == sketch_noise.table(res) + "\n", (
            f"{path} differs from the committed sweep: run python -m theory.sketch_noise --readme")
    long = next(r for r in res["rows"] if r["long"])
    assert long["restated"] < long["run_mean"] <= long["derived"]
    assert all(c.ok for c in sketch_noise.checks(res, sketch_noise.RTOL))
