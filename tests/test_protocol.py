"""fslora_min/study/protocol.py: the t distribution against tabled values and closed forms in
both tails, the paired interval's coverage and p-value, Holm's correction, verdicts with and
without it, divergence, grid choice with divergence and edges, plateau checks. Deterministic: the
one random test prints its seed."""

import math
import random
import statistics

import pytest

from fslora_min.study.protocol import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Paired,
                                       choose, diverged, diverged_seeds, holm, incomplete_beta,
                                       paired_interval, plateau, t_cdf, t_quantile, t_sf, verdict,
                                       widen)

SEED = 20261207
# (q, df, t_q): Student t quantiles as printed in standard tables (e.g. NIST/SEMATECH e-Handbook
# 1.3.6.7.2) to the digits given; df = 1 is tan(pi (q - 1/2)).
TABLED = [(0.975, 1, 12.7062), (0.99, 1, 31.8205), (0.9999, 1, 3183.0988), (0.975, 2, 4.3027),
          (0.975, 4, 2.7764), (0.995, 5, 4.0321), (0.9999, 10, 5.6938), (0.999, 30, 3.3852),
          (0.9995, 100, 3.3905), (0.975, 10_000, 1.9602), (0.9999, 10_000, 3.7204)]
LEVELS = [1e-4, 1e-3, 0.01, 0.025, 0.3, 0.5, 0.6, 0.9, 0.975, 0.978, 0.99, 0.995, 0.999, 0.9999]


@pytest.mark.parametrize("q,df,want", TABLED)
def test_t_quantile_matches_tabled_values(q, df, want):
    assert t_quantile(q, df) == pytest.approx(want, abs=5e-5 * max(1.0, want / 100))
    assert t_quantile(1 - q, df) == pytest.approx(-t_quantile(q, df), rel=1e-12)


def t4_quantile(q: float) -> float:
    """df = 4 in closed form: a = 4 q (1 - q), t = sign(q - 1/2) 2 sqrt(cos(arccos(sqrt a) / 3)
    / sqrt a - 1)."""
    a = 4 * q * (1 - q)
    return math.copysign(2 * math.sqrt(math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a) - 1),
                         q - 0.5)


def t_large_df_quantile(q: float, df: int) -> float:
    """The Cornish-Fisher expansion about the normal quantile z: z + (z^3 + z) / (4 df)
    + (5 z^5 + 16 z^3 + 3 z) / (96 df^2), its next term O(z^7 / df^3) (~1e-10 at df = 10^4)."""
    z = statistics.NormalDist().inv_cdf(q)
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@pytest.mark.parametrize("q", LEVELS)
def test_t_quantile_matches_closed_forms_in_both_tails(q):
    assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-9, abs=1e-12)
    assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-9,
                                             abs=1e-12)
    assert t_quantile(q, 4) == pytest.approx(t4_quantile(q), rel=1e-8, abs=1e-12)
    assert t_quantile(q, 10_000) == pytest.approx(t_large_df_quantile(q, 10_000), rel=1e-8,
                                                  abs=1e-12)
    for df in (1, 3, 10, 100, 10_000):
        assert t_cdf(t_quantile(q, df), df) == pytest.approx(q, rel=1e-9)


def test_t_cdf_is_monotone_and_symmetric_far_into_the_tails():
    xs = [0.0] + [10 ** (e / 4) for e in range(-8, 25)]  # 0.01 .. 10^6
    for df in (1, 2, 5, 30, 10_000):
        tails = [t_sf(x, df) for x in xs]
        assert all(a > b or a == b == 0 for a, b in zip(tails, tails[1:]))  # 0: underflow
        assert all(t_cdf(x, df) + t_cdf(-x, df) == pytest.approx(1.0, abs=1e-15) for x in xs)
    assert t_sf(1e6, 1) == pytest.approx(math.atan(1e-6) / math.pi, rel=1e-9)  # Cauchy's tail


def test_incomplete_beta_against_closed_forms():
    for x in (1e-6, 0.1, 0.5, 0.9, 1 - 1e-9):
        assert incomplete_beta(1, 1, x) == pytest.approx(x, rel=1e-12)
        assert incomplete_beta(2, 3, x) == pytest.approx(  # I_x(2, 3) = 6x^2 - 8x^3 + 3x^4
            6 * x ** 2 - 8 * x ** 3 + 3 * x ** 4, rel=1e-10)
        assert incomplete_beta(0.5, 0.5, x) == pytest.approx(  # arcsine law
            2 / math.pi * math.asin(math.sqrt(x)), rel=1e-10)


def test_paired_interval_covers_the_true_mean_95_percent_of_the_time():
    print(f"seed {SEED}")
    rng = random.Random(SEED)
    mu, hits, trials = rng.uniform(-1, 1), 0, 1000
    for _ in range(trials):
        p = paired_interval([rng.gauss(mu, 0.3) for _ in range(5)])
        hits += p.low <= mu <= p.high
    assert 0.93 < hits / trials < 0.97


def test_p_value_agrees_with_the_interval_and_a_hand_computation():
    d = [-0.1, -0.3, -0.2]  # mean -0.2, sd 0.1, t = -0.2 sqrt(3) / 0.1 = -3.4641, df 2
    p = paired_interval(d)
    t = 2 * math.sqrt(3)  # df 2: P(T > t) = (1 - t / sqrt(2 + t^2)) / 2
    assert p.p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert p.p > 0.05 and p.high > 0 and verdict(p) == INCONCLUSIVE  # p = 0.074
    tight = paired_interval([-0.19, -0.21, -0.2])
    assert tight.p < 0.05 and tight.high < 0 and verdict(tight) == REPRODUCED
    assert paired_interval([0.2, 0.2]).p == 0.0 and paired_interval([0.0, 0.0]).p == 1.0
    assert math.isnan(paired_interval([math.inf, 0.1]).p)


def test_holm_adjusts_step_down_and_keeps_the_input_order():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []
    p = Paired(3, -0.2, -0.3, -0.1, 0.01)
    assert verdict(p) == REPRODUCED and verdict(p, adjusted=0.06) == INCONCLUSIVE
    assert verdict(Paired(3, 0.2, 0.1, 0.3, 0.01), adjusted=0.03) == NOT_REPRODUCED


def test_verdict_follows_the_interval_sign():
    assert verdict(Paired(5, -0.2, -0.3, -0.1)) == REPRODUCED
    assert verdict(Paired(5, 0.2, 0.1, 0.3)) == NOT_REPRODUCED
    assert verdict(Paired(5, -0.1, -0.3, 0.1)) == INCONCLUSIVE
    assert verdict(paired_interval([math.inf, -1.0, -1.0])) == INCONCLUSIVE
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_interval([0.1])


def test_choice_never_takes_a_diverged_point_and_flags_edges():
    lrs, steps = [0.1, 0.3, 1.0], [1.0, 4.0]
    scores = {(lr, g): 2.0 + abs(lr - 0.3) + g / 10 for lr in lrs for g in steps}
    scores[(0.3, 1.0)] = math.inf  # diverged on one tuning seed: not chosen
    c = choose(scores, lrs, steps)
    assert c.point == (0.1, 1.0) and c.edges == ("lowest lr", "lowest server step")
    assert widen(lrs, c.edges, "lr", 3.0) == pytest.approx([0.1 / 3, 0.1, 0.3, 1.0])
    assert widen(steps, c.edges, "server step", 2.0) == [0.5, 1.0, 4.0]
    assert choose({(0.3, 1.0): 1.0}, [0.3], [1.0]).edges == ()  # one value: no edge
    assert choose({p: math.inf for p in scores}, lrs, steps).point is None


def test_divergence_and_plateau():
    assert diverged([3.0, 2.0, math.nan]) and diverged([3.0, 2.0, 3.5])
    assert not diverged([3.0, 2.5, 2.4])
    curves = [[3.0, 2.0, 3.5], [3.0, 2.5, 2.4], [3.0, math.inf, 2.0]]
    assert diverged_seeds(curves, 1) == 1 and diverged_seeds(curves, 2) == 2
    falling = [3.0 * 0.99 ** t for t in range(100)]
    flat = [2.0 + 1.0 / (t + 1) ** 3 for t in range(100)]
    assert not plateau(falling) and plateau(flat)
