"""fslora_min/linear.py: the whitened design makes the loss exactly 1/2 ||W - W*||^2, FSLoRA
with every client at full rank is FedAvg-LoRA step for step, the plateau test can fail, and
small runs land on theory/sketch_bias.py's fixed points (float64 throughout)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fslora_min.linear import (LinearConfig, LinearModel, measured_fraction, planted_target,
                               run_linear, settled, spectrum, squared_loss, whitened_design)
from fslora_min.study.linear_study import predicted, smallest_steps
from fslora_min.study.protocol import spearman

SMALL = LinearConfig(m=6, n=6, target_rank=4, rank=4, alpha=4.0, client_ranks=(2, 2),
                     samples=8, rounds=150, lr=0.1)


def test_whitened_design_makes_the_loss_the_frobenius_distance():
    cfg, g = SMALL, torch.Generator().manual_seed(3)
    target, z = planted_target(cfg, g), whitened_design(cfg, g)
    assert torch.allclose(z.T @ z / len(z), torch.eye(cfg.n, dtype=torch.float64), atol=1e-12)
    assert np.allclose(torch.linalg.svdvals(target)[:cfg.target_rank].numpy(), spectrum(cfg))
    model = LinearModel(cfg, cfg.rank, g)
    with torch.no_grad():
        model.proj.lora_B.normal_(generator=g)
        w = model.proj.weight + model.proj.delta_weight()
    loss = squared_loss(model, z, z @ target.T)
    assert float(loss.detach()) == pytest.approx(0.5 * float(((w - target) ** 2).sum()), rel=1e-12)


def test_fslora_at_full_client_rank_is_fedavg_lora_step_for_step():
    cfg = replace(SMALL, client_ranks=(4, 4), rounds=5)
    a, b = run_linear(cfg), run_linear(replace(cfg, method="fedavg-full"))
    assert a["curve"] == pytest.approx(b["curve"], rel=1e-12, abs=1e-15)


def test_plateau_test_fails_on_a_falling_curve():
    assert not settled([0.9 ** t for t in range(30)])
    assert settled([0.5 + 0.5 * 0.5 ** t for t in range(100)])
    assert measured_fraction([1.0] * 90 + [0.2] * 10) == pytest.approx(0.2)


def test_the_goal_takes_each_configuration_at_its_smallest_step():
    rows = [("a", SMALL, 0.5, 0.4, False), ("b", replace(SMALL, lr=0.01), 0.5, 0.49, True),
            ("c", replace(SMALL, method="hetlora"), 0.25, 0.25, True), ("d", SMALL, None, 1, True)]
    assert [r[0] for r in smallest_steps(rows)] == ["b", "c"]


def test_spearman_averages_ties():
    assert spearman([0, 0, 1, 2], [0.1, 0.1, 0.5, 0.9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fslora", "fedavg-min", "hetlora", "flora"])
def test_small_runs_reach_the_predicted_fixed_point(method):
    cfg = replace(SMALL, method=method, client_ranks=(1, 2) if method == "hetlora" else (2, 2))
    curve = run_linear(cfg)["curve"]
    assert settled(curve)
    assert measured_fraction(curve) == pytest.approx(predicted(cfg), abs=0.02)
