"""Rank collapse's measurements (fslora_min/study/rank_energy.py, planted_energy.py): the
update's spectrum and the per-index energy against float64 NumPy, the `collapsed` rule on
spectra whose shares are known, and a recorded planted run equal to the study's run of the same
settings, bit for bit."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fslora_min.ranks import PAPER_RATIOS, ranks_from_ratios
from fslora_min.study.config import quick_config, task
from fslora_min.study.protocol import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from fslora_min.study.planted_energy import (bit_for_bit, lower, planted_target, record_planted,
                                            verdict_text, yardstick)
from fslora_min.study.rank_energy import (collapse_table, collapsed, index_energy, top_share,
                                          update_spectrum)
from fslora_min.study.runs import machine, train_run
from fslora_min.study.tuning import with_run


@pytest.mark.parametrize("m, n, r", [(32, 128, 16), (128, 32, 16), (8, 8, 1), (5, 7, 12)])
def test_spectrum_and_energy_match_float64(m, n, r):
    """float32 factors, a merged W0' != W0 (FLoRA, FedEx-LoRA), r above min(m, n) too: the
    singular values of (W0' - W0) + s B A and e_j = ||s B[:, j] A[j, :]||_F, the latter from
    the rank-1 term itself, not from the product of norms the code uses."""
    g = torch.Generator().manual_seed(m * n * r)
    w0, merged = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    B, A, s = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), 0.37
    got = update_spectrum(w0 + merged, w0, B, A, s).numpy()
    b, a = B.double().numpy(), A.double().numpy()
    delta = ((w0 + merged).double() - w0.double()).numpy() + s * b @ a  # float64 reference
    want = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * want[0])
    energy = index_energy(B, A, s).numpy()
    want_e = [np.linalg.norm(s * np.outer(b[:, j], a[j])) for j in range(r)]
    np.testing.assert_allclose(energy, want_e, rtol=1e-12)
    assert energy.shape == (r,) and got.dtype == np.float64


def test_top_share_and_collapse_on_known_spectra():
    flat, k = [1.0] * 16, 2
    assert top_share(flat, k) == pytest.approx(2 / 16)
    geometric = [2.0 ** -ell for ell in range(16)]  # energy 4^-l: top 2 hold 5/4 / (4/3 (1-4^-16))
    assert top_share(geometric, k) == pytest.approx(0.9375, abs=1e-9)
    assert top_share([3.0, 4.0, 0.0], 1) == pytest.approx(9 / 25)  # squares, not magnitudes
    assert np.isnan(top_share([0.0] * 4, k)) and not collapsed([0.0] * 4, k, 0.125)
    target = top_share(flat, k)
    assert not collapsed(flat, k, target) and collapsed(geometric, k, target)
    # the rule's factor 2: against a target share of 0.125, 0.24 is not collapsed, 0.26 is
    for share, want in ((0.24, False), (0.26, True)):
        top = (share * 16 / 2) ** 0.5  # two values of x, fourteen of y, x^2 / (x^2 + 7 y^2)
        rest = ((1 - share) * 16 / 14) ** 0.5
        assert collapsed([top, top] + [rest] * 14, k, target) is want


def test_collapse_table_rows_and_extra_columns():
    text, verdicts = collapse_table({"a": [1.0] * 4, "b": [1.0, 0.1, 0.0, 0.0]}, 1, 0.25, 0.5,
                                    {"loss": ["1.0", "2.0"]})
    assert verdicts == {"a": False, "b": True}
    lines = text.splitlines()
    assert lines[0] == ("| method | top-1 share of the energy (target 0.250) | singular values "
                        "> 0.5 | collapsed | loss |")
    assert lines[2:] == ["| a | 0.250 | 4 of 4 | no | 1.0 |", "| b | 0.990 | 1 of 4 | yes | 2.0 |"]


def test_lower_and_what_collapse_explains():
    claims = [{"a": "fslora", "b": b, "verdict": word, "raw": raw, "rounds": 300, "family": 4}
              for b, word, raw in (("hetlora", REPRODUCED, REPRODUCED),
                                   ("flexlora", NOT_REPRODUCED, NOT_REPRODUCED),
                                   ("flasc", "flasc lower", "flasc lower"),
                                   ("rolora", INCONCLUSIVE, "rolora lower"))]
    assert [lower(c) for c in claims] == ["fslora", "flexlora", "flasc", None]
    assert lower(claims[3], "raw") == "rolora"
    weight = {"fslora": False, "hetlora": True, "flexlora": True, "flasc": False}
    text = verdict_text(claims, {"weight": weight, "whitened": weight | {"fslora": True}})
    # fslora below a collapsed hetlora: explained; flexlora collapsed yet lower, flasc and
    # fslora both not collapsed: not explained; rolora undecided and not recorded. Whitened,
    # fslora collapsed too: its win over hetlora is not explained, flasc's over it is
    assert ("Holm-corrected, in weight 1 of 3 (fslora vs hetlora), in whitened 1 of 3 (fslora "
            "vs flasc); raw, in weight 1 of 4") in text
    assert "fslora (collapsed: no / yes) vs hetlora (collapsed: yes / yes): reproduced" in text
    assert "rolora (not recorded): inconclusive (raw: rolora lower)" in text
    assert "Holm-corrected over the 4 claim x horizon cells" in text
    assert yardstick({"weight": weight}) == ""
    both = {"w": {"fedavg-full": True}, "x": {"fedavg-full": False}, "none measured": {}}
    assert "in w: yes, in x: no; where it reads yes" in yardstick(both)
    units = {"weight": weight, "indices": {"hetlora": True}}  # fslora: no index energy
    assert "fslora (collapsed: no / -) vs hetlora (collapsed: yes / yes)" in verdict_text(
        claims, units)


def test_bit_for_bit_words():
    run = {"curve": [2.0, 1.5, 1.25], "machine": machine()}
    assert bit_for_bit(run, {"curve": [2.0, 1.5, 1.25, 1.0], "machine": {}}) == "yes"
    assert bit_for_bit(run, None) == "no committed seed-0 run yet"
    assert "same machine" in bit_for_bit(run, {"curve": [2.0, 1.5, 1.5], "machine": machine()})
    assert "other machine" in bit_for_bit(run, {"curve": [2.0, 1.5, 1.5], "machine": {}})


def quick_planted():
    """The planted task in miniature (rank-4 target), FSLoRA at the paper's ratios, 3 rounds."""
    cfg = quick_config(task_name="planted")
    exp = replace(task(cfg), method="fslora",
                  client_ranks=ranks_from_ratios(list(PAPER_RATIOS), cfg.num_clients, cfg.rank))
    return with_run(exp, 0, 0.03, 1.0, 3)


def test_target_is_flat_in_whitened_units_only():
    """planted_target's root whitens what planted_delta built: Delta Sigma^(1/2) has R* equal
    singular values (then zeros); Delta's own are spread by the inputs' scales."""
    exp = quick_planted()
    delta, root = planted_target(exp)
    r_star = exp.data.planted.rank
    white = torch.linalg.svdvals(delta @ root)
    assert torch.allclose(white[:r_star], white[0].expand(r_star), rtol=1e-6)
    assert white[r_star] < 1e-6 * white[0]
    raw = torch.linalg.svdvals(delta)
    assert raw[0] > 1.2 * raw[r_star - 1]


def test_recording_leaves_the_run_as_the_study_trains_it():
    """Recorded every round, the run's held-out curve is train_run's (the study's runs), bit
    for bit; with an identity root the whitened spectra are the plain ones."""
    torch.set_num_threads(1)
    exp = quick_planted()
    n = exp.model.d_model * 4  # blocks.1.mlp.proj's inputs
    run = record_planted(exp, 1, torch.eye(n, dtype=torch.float64))
    assert run["curve"] == train_run(exp)["curve"]
    assert run["rounds"] == [0, 1, 2, 3] and run["layer"] == exp.data.planted.layer
    assert run["whitened"] == run["spectra"]
    assert len(run["energy"][-1]) == exp.lora.rank and max(run["spectra"][0]) == 0.0
    assert max(run["spectra"][-1]) > 0  # the layer moved
