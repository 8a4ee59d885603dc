"""fslora_min/study/planted_report.py: the planted task's preconditions (KL per seed, the
ladder's gaps against their intervals) and the KL a rank-k student leaves at best."""

from dataclasses import asdict

import pytest
import torch

from fslora_min.data import DataConfig
from fslora_min.model import TEST_CONFIG, Transformer
from fslora_min.planted import (PlantedConfig, PlantedDataConfig, make_teacher, planted_kl,
                                probe_inputs, teacher_from)
from fslora_min.study.planted_report import (MIN_GAP_RATIO, contrast, gap_left, kl_left,
                                             ladder_gaps, preconditions_markdown)
from fslora_min.study.protocol import Choice
from fslora_min.study.tuning import Row
from fslora_min.tasks import federated_data, on_base

DATA = DataConfig(vocab_size=TEST_CONFIG.vocab_size, seq_len=TEST_CONFIG.context,
                  n_base_topics=3, successors=2, train_seqs=4, heldout_seqs=2,
                  global_heldout_seqs=12, seed=int(torch.randint(1000, ())))
PLANTED = PlantedConfig(layer="blocks.0.mlp.proj", rank=4, strength=2.0, prefix=2,
                        probe_seqs=16, train_seqs=DATA.train_seqs)


def row(label: str, finals: dict[int, float], start: float = 3.0) -> Row:
    runs = [{"seed": s, "curve": [start, (start + f) / 2, f]} for s, f in finals.items()]
    return Row(label, Choice((0.1, 1.0), ()), {}, runs)


def test_a_ladder_gap_holds_only_when_positive_and_wide_of_its_interval():
    base = {s: 2.0 + 0.01 * s for s in range(5)}
    clear = [row("r=2", {s: v + 0.10 for s, v in base.items()}), row("r=4", base)]
    noisy = [row("r=2", {s: v + (0.10 if s % 2 else -0.05) for s, v in base.items()}),
             row("r=4", base)]
    backwards = [row("r=2", base),
                 row("r=4", {s: v + 0.10 + 0.01 * (s % 2) for s, v in base.items()})]
    (g,), (n,), (b,) = (ladder_gaps(rows, 2) for rows in (clear, noisy, backwards))
    assert g["holds"] and g["ratio"] >= MIN_GAP_RATIO and g["pair"] == ("r=2", "r=4")
    assert g["interval"].mean == pytest.approx(0.10)
    assert not n["holds"] and 0 < n["ratio"] < MIN_GAP_RATIO
    assert not b["holds"] and b["ratio"] < 0
    (p,) = ladder_gaps([row("r=2", {0: 2.1}), row("r=4", {0: 2.0})], 2)
    assert p["interval"] is None and not p["holds"]  # one seed: pending, never "holds"


def test_the_report_says_fails_when_a_seed_is_below_the_kl_floor():
    kls = [{"seed": 0, "kl": 0.30, "base": 3.0, "teacher": 2.0, "left": {2: 0.7}, "r_star": 4},
           {"seed": 1, "kl": 0.05, "base": 3.0, "teacher": 2.0, "left": {2: 0.8}, "r_star": 4}]
    ladder = [row("r=2", {0: 2.5, 1: 2.25})]
    trained = gap_left(ladder, kls, 2)
    assert trained == [["r=2", "0.500", "0.250"]]  # (L - floor) / (L_0 - floor)
    text = preconditions_markdown(kls, [], 2, trained)
    assert "KL >= 0.1 nat on every seed: **FAILS**" in text and "| 1 | 0.0500 |" in text
    assert "rank 2 leaves 0.25-0.50 of the loss gap" in contrast(kls, trained)


def test_kl_left_falls_with_k_and_is_zero_with_every_term():
    task = PlantedDataConfig(**asdict(DATA), planted=PLANTED)
    base = Transformer(TEST_CONFIG).eval()
    seqs = on_base(task, federated_data(task, 2), base).global_heldout
    teacher = make_teacher(base, task, PLANTED)
    left = kl_left(base, teacher, task, PLANTED, seqs, 1)
    assert set(left) == {2}  # LEFT_AT's k below R* = 4
    full = planted_kl(teacher, base, seqs, 1)
    assert 0 < left[2] < full
    every = teacher_from(base, task, PLANTED, probe_inputs(base, task, PLANTED),
                         list(range(PLANTED.rank)))
    assert planted_kl(teacher, every, seqs, 1) == pytest.approx(0.0, abs=1e-6)
