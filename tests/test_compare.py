"""The comparison runner: device-profile budgets, the FLOP estimate, and a --quick run end to end
(every table and figure written, every method present, runs resumed from runs.jsonl)."""

import json

import pytest

from fslora_min.cli import main
from fslora_min.compare import (MAIN_METHODS, CompareConfig, budget_table, flops_per_local_step,
                                module_shapes,
                                task)
from fslora_min.profiles import (DEFAULT_PROFILES, DeviceProfile, budgets_from_profiles,
                                 memory_bytes, rank_budget, upload_bytes)


def test_profiles_give_the_largest_rank_that_fits_both_budgets():
    shapes = module_shapes(task(CompareConfig()))
    assert sum(m + n for m, n in shapes) == 1152
    ks = [k for _, k in budgets_from_profiles(DEFAULT_PROFILES, 4, shapes, r=16)]
    assert ks == [2, 4, 8, 12]  # the paper's ratios 1/8, 1/4, 1/2, 3/4 of r = 16
    for profile, k in zip(DEFAULT_PROFILES, ks):
        assert memory_bytes(k, shapes, 4, "sgd") <= profile.memory_bytes
        assert upload_bytes(k, shapes, 4) <= profile.upload_bytes
        if k < 16:  # one more rank would break a budget
            assert (memory_bytes(k + 1, shapes, 4, "sgd") > profile.memory_bytes
                    or upload_bytes(k + 1, shapes, 4) > profile.upload_bytes)
    big = DeviceProfile("server", 2**30, 2**30)
    assert rank_budget(big, shapes, r=16) == 16  # capped at r
    assert rank_budget(DEFAULT_PROFILES[1], shapes, 16, optimizer="adamw") == 2  # moments cost
    with pytest.raises(ValueError, match="cannot train even rank 1"):
        rank_budget(DeviceProfile("toaster", 100, 100), shapes, 16)


def test_flop_estimate_grows_by_six_per_lora_number_per_token():
    exp = task(CompareConfig())
    tokens = exp.client.batch_size * exp.data.seq_len
    assert flops_per_local_step(exp, 3) - flops_per_local_step(exp, 2) == 6 * tokens * 1152


def test_quick_compare_writes_every_table_and_figure(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--out", str(out)]) == 0
    for name in ("main", "global_rank", "sketch_ratio", "sketch_vs_nosketch", "importance"):
        text = (out / f"{name}.md").read_text()
        assert "± " in text and "chosen" in text
        assert (out / f"{name}.png").stat().st_size > 0
    assert (out / "coverage.png").stat().st_size > 0
    main_md = (out / "main.md").read_text()
    assert all(f"| {m} |" in main_md for m in MAIN_METHODS)
    assert "| watch |" in main_md  # the budget table
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    seeds = {r["summary"]["seed"] for r in runs if r["summary"]["method"] == "hetlora"}
    assert seeds == {0, 1, 100}  # evaluation seeds and the separate tuning seed
    before = len(runs)
    assert main(["compare", "--quick", "--out", str(out)]) == 0  # resumes: nothing re-run
    assert len((out / "runs.jsonl").read_text().splitlines()) == before


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_client_budgets_use_the_clients_optimizer_memory(optimizer):
    cfg = CompareConfig(optimizer=optimizer, num_clients=4)
    exp = task(cfg)
    shapes = module_shapes(exp)
    md, ks = budget_table(exp, cfg)
    for profile, k in zip(DEFAULT_PROFILES, ks):
        used = memory_bytes(k, shapes, 4, optimizer)
        assert used <= profile.memory_bytes, (profile.name, k, used)
        if k < cfg.rank:
            assert (memory_bytes(k + 1, shapes, 4, optimizer) > profile.memory_bytes
                    or upload_bytes(k + 1, shapes, 4) > profile.upload_bytes)
        assert f"| {profile.name} |" in md and f"| {k} | {used / 1024:.1f} |" in md
    if optimizer == "adamw":
        assert ks == [1, 2, 8, 12]  # AdamW's two moments halve the memory-limited budgets
