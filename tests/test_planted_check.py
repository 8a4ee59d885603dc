"""theory/planted_check.py: the least-squares prediction beside the planted task's runs."""

import numpy as np
import pytest

from fslora_min.study.protocol import spearman
from theory.planted_check import main, measured_fractions, predicted_fraction


@pytest.mark.parametrize("method,ranks,want", [
    ("fedavg-min", (1, 2, 3, 4), 15 / 16),  # rank 1 of 16 equal directions: 15 left
    ("fedavg-full", (1, 2, 3, 4), 0.0),
    ("hetlora", (1, 2, 3, 4), 12 / 16),  # ranks past max k_i = 4 never train
    ("flora", (1, 2, 3, 4), 0.0),
])
def test_predicted_fraction_of_the_flat_target(method, ranks, want):
    assert predicted_fraction(method, 16, 16, ranks) == pytest.approx(want, abs=1e-12)


def test_fslora_leaves_part_of_a_flat_target_unless_every_client_has_k_equal_r():
    small = predicted_fraction("fslora", 16, 16, (1, 2, 3, 4))
    assert 0 < small < 1
    assert predicted_fraction("fslora", 16, 16, (16,) * 4) == pytest.approx(0.0, abs=1e-12)
    assert predicted_fraction("fslora", 16, 16, (8,) * 4) < small  # less sketching, less bias


def test_measured_fraction_is_the_gap_left_seed_by_seed():
    rng = np.random.default_rng()
    curves, ref, want = {}, {}, []
    for s in range(3):
        l0, lref, frac = 3 + rng.random(), 1 + rng.random(), rng.random()
        ref[s] = [l0, lref + 0.5, lref]
        curves[s] = [l0, 2.5, lref + frac * (l0 - lref)]
        want.append(frac)
    curves[7] = [1.0, 1.0, 1.0]  # a seed the reference lacks is left out
    assert measured_fractions(curves, ref, 2) == pytest.approx(want)


def test_spearman_orders():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


@pytest.mark.slow
def test_script_runs_on_the_committed_runs(tmp_path, capsys):
    assert main(["--figures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nothing to compare" in out or (tmp_path / "planted_prediction.png").exists()
