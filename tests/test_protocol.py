"""fslora_min/study/protocol.py: the t quantile against closed forms, the paired interval's
coverage, verdicts, grid choice with divergence and edges, plateau checks."""

import math
import random
import statistics

import pytest

from fslora_min.study.protocol import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Paired, choose,
                                 diverged, paired_interval, plateau, t_quantile, verdict, widen)


def test_t_quantile_matches_closed_forms():
    q = random.uniform(0.55, 0.99)
    assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-5)  # Cauchy
    # df = 2: F^{-1}(q) = (2q - 1) / sqrt(2 q (1 - q))
    assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-5)
    normal = statistics.NormalDist().inv_cdf(q)
    assert t_quantile(q, 5000) == pytest.approx(normal, rel=1e-3)
    assert t_quantile(1 - q, 4) == pytest.approx(-t_quantile(q, 4), rel=1e-6)


def test_paired_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random()
    mu, hits, trials = rng.uniform(-1, 1), 0, 1000
    for _ in range(trials):
        p = paired_interval([rng.gauss(mu, 0.3) for _ in range(5)])
        hits += p.low <= mu <= p.high
    assert 0.92 < hits / trials < 0.98


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
    falling = [3.0 * 0.99 ** t for t in range(100)]
    flat = [2.0 + 1.0 / (t + 1) ** 3 for t in range(100)]
    assert not plateau(falling) and plateau(flat)
