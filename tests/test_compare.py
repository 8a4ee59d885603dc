"""The reproduction study (fslora_min/study/): device-profile budgets, the FLOP estimate, the
run cache and its key, tuning by successive halving on a fake loss surface, claims, a
--quick run end to end and its replay, bad output folders, and the READMEs against the
committed runs."""

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn as nn

from fslora_min.study.cli import main as compare
from fslora_min.client import ClientUpdate
from fslora_min.study.compare import claim_results, holm_correct, study, table_files
from fslora_min.study.config import COMMITTED, MAIN_METHODS, STUDY_TASKS, CompareConfig, task
from fslora_min.study.readme import README_BLOCKS, block_pattern, duration, readme_blocks
from fslora_min.study.runs import RunCache, run_key, run_settings, train_run, truncate
from fslora_min.study.tables import RowSpec, TableSpec, build_tables, server_steps
from fslora_min.study.tuning import Row, tune, with_run
from fslora_min.lora import LoRALinear
from fslora_min.planted import PlantedConfig, PlantedDataConfig
from fslora_min.study.protocol import Choice, paired_interval
from fslora_min.study.profiles import (DEFAULT_PROFILES, DeviceProfile, budget_table,
                                       budgets_from_profiles, flops_per_local_step,
                                       memory_bytes, module_shapes, rank_budget, upload_bytes)
from fslora_min.server import Server, ServerConfig
from fslora_min.sketch import Sketch


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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_client_budgets_use_the_clients_optimizer_memory(optimizer):
    cfg = CompareConfig(num_clients=4)
    exp = task(cfg)
    exp = replace(exp, client=replace(exp.client, optimizer=optimizer))
    shapes = module_shapes(exp)
    md, ks = budget_table(exp)
    for profile, k in zip(DEFAULT_PROFILES, ks):
        used = memory_bytes(k, shapes, 4, optimizer)
        assert used <= profile.memory_bytes, (profile.name, k, used)
        if k < cfg.rank:
            assert (memory_bytes(k + 1, shapes, 4, optimizer) > profile.memory_bytes
                    or upload_bytes(k + 1, shapes, 4) > profile.upload_bytes)
        assert f"| {profile.name} |" in md and f"| {k} | {used / 1024:.1f} |" in md
    if optimizer == "adamw":
        assert ks == [1, 2, 8, 12]  # AdamW's two moments halve the memory-limited budgets


def test_run_key_holds_what_changes_numbers_and_nothing_else():
    exp = task(CompareConfig())
    key = run_key(exp)
    assert key == run_key(replace(exp, out_dir="elsewhere", checkpoint_every=3))
    assert key == run_key(with_run(exp, 0, exp.client.lr, 1.0, 7))
    planted = PlantedConfig(train_seqs=exp.data.train_seqs)  # the same text, continued
    assert key != run_key(replace(exp, data=PlantedDataConfig(**asdict(exp.data),
                                                              planted=planted)))
    for changed in (replace(exp, client=replace(exp.client, lr=0.123)),
                    replace(exp, data=replace(exp.data, seed=5)),
                    replace(exp, federation=replace(exp.federation, seed=5)),
                    replace(exp, method="hetlora")):
        assert run_key(changed) != key
    content = run_settings(exp)
    assert key == hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    settings = content["settings"]
    assert {"data.seed", "federation.seed", "pretrain.seed", "rank"} <= set(settings)
    assert "rounds" not in settings and "out_dir" not in settings
    evaluation = with_run(exp, 3, 0.1, 2.0, 10)  # a seed sets the data and the federation
    assert evaluation.data.seed == evaluation.federation.seed == 3


class FakeCache:
    """Runs on a random smooth loss surface over (lr, step): no training; counts what it ran."""

    def __init__(self, best_lr: float, best_step: float, diverge_above: float):
        self.best, self.diverge_above = (math.log(best_lr), math.log(best_step)), diverge_above
        self.asked: list[tuple[float, float, int, int]] = []

    def get(self, exp):
        lr, step, seed, t = (exp.client.lr, exp.server.server_lr, exp.federation.seed,
                             exp.federation.rounds)
        self.asked.append((lr, step, seed, t))
        if lr * step > self.diverge_above:
            return {"curve": [3.0] + [math.inf] * t, "seed": seed}
        d = (math.log(lr) - self.best[0]) ** 2 + (math.log(step) - self.best[1]) ** 2
        end = 2 + 0.9 * d / (1 + d)  # below the start: no point diverges by its loss alone
        return {"curve": [3.0 + (end - 3.0) * i / t for i in range(t + 1)], "seed": seed}


def test_tuning_halves_the_grid_never_takes_a_diverged_point_and_widens_an_edge():
    cfg = CompareConfig(rung=0.25, keep=0.25)
    row = RowSpec("x", task(cfg), (0.03, 0.1, 0.3, 1.0), (1.0, 2.0, 4.0, 8.0))
    cache = FakeCache(random.choice([0.1, 0.3]), random.choice([2.0, 4.0]), diverge_above=1e9)
    choice, grid = tune(row, (100, 101), 40, cfg, cache)
    assert choice.edges == () and choice.point == pytest.approx((math.exp(cache.best[0]),
                                                                 math.exp(cache.best[1])))
    long = {(lr, g) for lr, g, _, t in cache.asked if t == 40}
    assert len(long) == 4 and {t for *_, t in cache.asked} == {10, 40}  # 16 to 10, 4 to 40
    assert {s for _, _, s, _ in cache.asked} == {100, 101}
    # the best is on the high-lr edge, but one step past it diverges: widened once, not flagged
    cache = FakeCache(3.0, 2.0, diverge_above=2.5)
    choice, grid = tune(replace(row, lr_grid=(0.1, 0.3, 1.0)), (100, 101), 40, cfg, cache)
    assert choice.point == (1.0, 2.0) and choice.edges == ()
    assert any(lr == pytest.approx(3.0) for lr, *_ in cache.asked)  # the widened column
    # an optimum far outside the grid stays on its edge after one widening: flagged
    cache = FakeCache(100.0, 2.0, diverge_above=1e9)
    choice, _ = tune(replace(row, lr_grid=(0.1, 0.3)), (100, 101), 40, cfg, cache)
    assert choice.point[0] == pytest.approx(0.9) and "highest lr" in choice.edges
    # every point diverges: both axes widen once downward, where a point learns
    cache = FakeCache(0.03, 1.0, diverge_above=0.09)
    choice, _ = tune(replace(row, lr_grid=(0.1, 0.3), step_grid=(1.0, 2.0)), (100, 101), 40,
                     cfg, cache)
    assert choice.point == pytest.approx((0.1 / 3, 1.0))
    assert any(g == 0.5 for _, g, *_ in cache.asked)  # the step axis widened too


def test_claims_pair_the_same_seeds_at_each_horizon():
    rng = random.Random()
    curves = {m: {s: [rng.uniform(2, 3) for _ in range(11)] for s in range(4)} for m in "ab"}
    rows = {m: Row(m, Choice((0.1, 1.0), ()), {},
                   [{"seed": s, "curve": c} for s, c in curves[m].items() if (m, s) != ("b", 3)])
            for m in "ab"}
    table = TableSpec("t", "t", "c", [], [("a", "b")], (0, 1, 2, 3), (2, 5, 10))
    results = claim_results(table, rows)
    assert [r["rounds"] for r in results] == [2, 5, 10]
    for r in results:
        want = paired_interval([curves["a"][s][r["rounds"]] - curves["b"][s][r["rounds"]]
                                for s in range(3)])
        assert r["seeds"] == 3 and r["paired"] == want


def test_a_diverged_row_is_never_the_other_rows_win_nor_a_plain_inconclusive():
    """b's loss ends above its start (or is non-finite) by the long horizon: the cells there say
    `diverged`, never "reproduced" (a below b) nor "inconclusive", and are not in Holm's family;
    the earlier horizons are decided as usual."""
    falling = [[3.0 - 0.1 * t - 0.01 * s for t in range(11)] for s in range(3)]
    rising = [[3.0 - 0.05 * t + (2.0 if t == 10 else 0.0) + 0.02 * s for t in range(11)]
              for s in range(3)]
    broken = [c[:10] + [math.inf] for c in falling]
    table = TableSpec("t", "t", "c", [], [("a", "b")], (0, 1, 2), (2, 5, 10))
    for b_curves in (rising, broken):
        rows = {m: Row(m, Choice((0.1, 1.0), ()), {},
                       [{"seed": s, "curve": c} for s, c in enumerate(curves)])
                for m, curves in (("a", falling), ("b", b_curves))}
        results = claim_results(table, rows)
        holm_correct([(table, results)])
        short, middle, long = results
        assert long["verdict"] == long["raw"] == "diverged: b (3 of 3 seeds)"
        assert long["p_holm"] is None and short["family"] == middle["family"] == 2
        assert short["verdict"] != long["verdict"]
    rows = {"a": Row("a", Choice((0.1, 1.0), ()), {},
                     [{"seed": s, "curve": c} for s, c in enumerate(rising)]),
            "b": Row("b", Choice((0.1, 1.0), ()), {},
                     [{"seed": s, "curve": [3.0] * 11} for s in range(3)])}
    long = claim_results(replace(table, paper=False), rows)[2]
    assert long["verdict"] == "diverged: a (3 of 3 seeds)"  # not "b lower" either


def test_cache_serves_shorter_horizons_and_survives_a_cut_last_line(tmp_path):
    log = tmp_path / "runs.jsonl"
    exp = task(CompareConfig())
    key = run_key(exp)
    curve = [3.0 - 0.01 * t for t in range(21)]
    summary = {"curve": curve, "acc": 0.5, "val_loss": 2.0, "coverage": {}, "wall": 20.0}
    log.write_text(json.dumps({"key": key, "summary": summary}) + "\n" + '{"key": "cut')
    cache = RunCache(log, [], train=False)
    short = cache.get(with_run(exp, exp.federation.seed, exp.client.lr, 1.0, 5))
    assert short["curve"] == curve[:6] and "acc" not in short and short["wall"] == 5.0
    assert cache.get(with_run(exp, 0, exp.client.lr, 1.0, 30)) is None
    log.write_text('{"key": "cut\n' + json.dumps({"key": key, "summary": summary}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a run record"):
        RunCache(log, [], train=False)


@pytest.mark.slow
def test_quick_compare_writes_its_tables_and_replays_without_training(tmp_path, capsys):
    assert compare(["--quick", "--out", str(tmp_path / "cmp")]) == 0
    out = tmp_path / "cmp" / "synthetic"  # each task writes into a folder of its own
    assert "| r=2 |" in (tmp_path / "cmp" / "planted" / "planted_ladder.md").read_text()
    assert "| fslora |" in (tmp_path / "cmp" / "shakespeare" / "main.md").read_text()
    assert "KL >= 0.1 nat" in (tmp_path / "cmp" / "planted" / "preconditions.md").read_text()
    linear = (tmp_path / "cmp" / "linear" / "predictions.md").read_text()
    assert all(f"| {m} k=2,4,8,12 |" in linear for m in ("fslora", "hetlora", "raflora"))
    text = (out / "main.md").read_text()
    assert all(f"| {m} |" in text for m in MAIN_METHODS) and "| watch |" in text
    verdicts = (out / "verdicts.md").read_text()
    assert "fslora < hetlora" in verdicts
    assert "| r=16 < r=4 | synthetic |" in verdicts  # every table of the task, pending or not
    for name in ("main.grid.md", "main.png", "coverage.png"):
        assert (out / name).stat().st_size > 0
    runs = [json.loads(line)["summary"]
            for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in runs if r["method"] == "hetlora"} == {0, 1, 100, 101}
    assert f"`--quick` ({len(runs)} runs of 3 rounds" in (COMMITTED / "README.md").read_text()
    sitting, = [json.loads(line) for line in (out / "sittings.jsonl").read_text().splitlines()]
    assert sitting["tables"] == ["main"] and sitting["runs_trained"] == len(runs)
    before = (out / "runs.jsonl").read_text()
    capsys.readouterr()
    assert compare(["--quick", "--out", str(tmp_path / "cmp")]) == 0
    assert capsys.readouterr().out.count(" 0 runs trained") == 3  # every task replayed
    assert (out / "runs.jsonl").read_text() == before
    assert len((out / "sittings.jsonl").read_text().splitlines()) == 1  # a replay costs nothing
    assert (out / "main.md").read_text() == text
    assert not list(out.glob(".*tmp"))


@pytest.mark.parametrize("args,needle", [
    (["--out", "/proc/x"], "argument --out: '/proc/x' is not writable"),
    (["--task", "planted", "--tables", "main"], "are not tables of task 'planted'"),
    (["--methods", "hetlora"], "argument --methods: must include fslora"),
])
def test_bad_compare_invocations_exit_with_a_message(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        compare(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_methods_whose_server_ignores_eta_g_are_not_tuned_over_it():
    grid = (1.0, 2.0, 4.0)
    assert server_steps("fslora", grid) == server_steps("hetlora", grid) == grid
    assert server_steps("flexlora", grid) == server_steps("flora", grid) == (1.0,)
    rows = {r.label: r for t in build_tables(CompareConfig(tables=("main",))) for r in t.rows}
    assert rows["flora"].step_grid == (1.0,) and len(rows["fslora"].step_grid) == 4


def test_compare_writes_under_runs_by_default():
    assert CompareConfig().out_dir == "runs/compare"


@pytest.mark.slow
def test_readmes_match_the_committed_runs():
    """Every study figure in results/compare/README.md and README.md is what `compare --readme`
    writes from the committed runs (results/compare/TASK/runs.jsonl)."""
    blocks = readme_blocks()
    assert sorted(n for names in README_BLOCKS.values() for n in names) == sorted(blocks)
    for path, names in README_BLOCKS.items():
        text = path.read_text()
        for name in names:
            found = block_pattern(name).search(text)
            assert found, f"{path} has no study:{name} block"
            assert found.group(2) == blocks[name], (
                f"{path}'s {name} block differs from the committed runs: "
                f"run python -m fslora_min compare --readme")
    # the decision counts, recounted from the verdict table's own cells
    cells = [line.split(" | ") for line in blocks["verdicts"].splitlines()[2:]]
    parts, gone = [], []
    for task_name in ("synthetic", "planted", "shakespeare"):
        mine = [c for c in cells if c[1] == task_name]
        kept = [c for c in mine if not c[-1].startswith("diverged")]
        raw = sum(c[-2] not in ("inconclusive", "pending") for c in kept)
        holm = sum(c[-1] not in ("inconclusive |", "pending |") for c in kept)
        parts.append(f"{task_name}: {raw} raw decisions, {holm} after Holm")
        if n := len(mine) - len(kept):
            gone.append(f"{n} {task_name} cell{'s' * (n > 1)} diverged")
    assert blocks["holm"] == "(" + "; ".join(parts + gone) + ")\n"


def test_the_readme_opens_with_its_answer_in_at_most_150_words_and_its_figure():
    text = (COMMITTED / "README.md").read_text()
    answer = block_pattern("answer").search(text)
    assert answer and text.index(answer.group(0)) < text.index("<!-- study:verdicts -->")
    assert len(answer.group(2).split()) <= 150 and "{" not in answer.group(2)  # all filled
    assert "](forest.png)" in text and (COMMITTED / "forest.png").stat().st_size > 0


def test_server_adamw_decays_the_factors_and_steps_by_the_sign_of_the_average():
    """The 'as published' row's server: AdamW on the pseudo-gradient -D; its first step is
    X <- X (1 - eta wd) + eta D / (|D| + eps) elementwise (Adam's first step is the sign)."""
    m, n, r = 3, 4, 4
    layer = LoRALinear(nn.Linear(n, m).double(), r, alpha=float(r))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(m, r, dtype=torch.float64))
    lr, wd = random.uniform(0.001, 0.1), random.uniform(0.001, 0.1)
    server = Server(nn.ModuleDict({"l": layer}), ServerConfig(optimizer="adamw", server_lr=lr,
                                                              weight_decay=wd))
    B0, A0 = layer.lora_B.detach().clone(), layer.lora_A.detach().clone()
    d = (torch.randn(m, r, dtype=torch.float64), torch.randn(r, n, dtype=torch.float64))
    server.apply_updates([ClientUpdate(0, {"l": Sketch(torch.arange(r), r)}, {"l": d}, 1, 0)])
    for x0, dx, x1 in ((B0, d[0], layer.lora_B), (A0, d[1], layer.lora_A)):
        want = x0 * (1 - lr * wd) + lr * dx / (dx.abs() + 1e-8)
        torch.testing.assert_close(x1.detach(), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="weight_decay: must be >= 0"):
        ServerConfig(optimizer="adamw", weight_decay=-1.0)


def test_curves_are_drawn_when_a_run_was_cut_from_a_longer_one(tmp_path):
    """A reduced table's run may be served by a longer run, truncated: it has no accuracy."""
    from fslora_min.study.plots import plot_curves

    cut = truncate({"curve": [3.0, 2.5, 2.2, 2.1], "acc": 0.4, "val_loss": 2.0, "coverage": {},
                    "wall": 3.0}, 2)
    whole = {"curve": [3.0, 2.6, 2.3], "acc": 0.3, "wall": 2.0}
    rows = [Row("a", Choice((0.1, 1.0), ()), {}, [cut, whole], 0.1, 1.0),
            Row("b", Choice((0.1, 1.0), ()), {}, [cut], 0.1, 1.0)]
    plot_curves(rows, "t", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("seconds,text", [(0, "0 s"), (51, "51 s"), (488, "8 min 8 s"),
                                          (3600, "1 h 0 min 0 s"), (480, "8 min 0 s"), (5571, "1 h 32 min 51 s")])
def test_duration_reads_as_hours_minutes_seconds(seconds, text):
    assert duration(seconds) == text


@pytest.mark.slow
def test_a_committed_run_retrains_bit_for_bit(tmp_path):
    """A replay is only as good as its keys: one committed planted run (the shortest tuning run
    that records its machine) retrained by the current code, on one thread as the study runs,
    gives its stored curve bit for bit on the machine that stored it (runs.machine). On another
    machine float32 rounds otherwise (another base model, possibly another teacher-written
    text), so only what no rounding touches is compared (the run's ranks, parameter counts,
    FLOPs, bytes) and the bitwise check is skipped, naming both machines."""
    cfg = CompareConfig(task="planted")
    cache = RunCache(tmp_path / "none.jsonl", [COMMITTED / "planted" / "runs.jsonl"], train=False)
    tuning = (with_run(row.exp, seed, lr, step, 1) for table in build_tables(cfg)
              for row in table.rows for lr in row.lr_grid for step in row.step_grid
              for seed in cfg.tune_seeds)
    found = ((e, s) for e in tuning for s in cache.runs.get(run_key(e), []) if "machine" in s)
    exp, stored = min(found, key=lambda pair: len(pair[1]["curve"]), default=(None, None))
    assert stored is not None, "the committed log holds no tuning run with its machine"
    exp = replace(exp, federation=replace(exp.federation, rounds=len(stored["curve"]) - 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fresh = train_run(exp)
    finally:
        torch.set_num_threads(threads)
    assert len(fresh["curve"]) == len(stored["curve"]) == exp.federation.rounds + 1
    for field in ("method", "seed", "lr", "server_lr", "rank", "client_ranks", "trained_ranks",
                  "trainable", "flops", "bytes_down", "bytes_up"):  # no float rounding in them
        assert fresh[field] == stored[field], field
    if fresh["machine"] != stored["machine"]:  # other roundings, even another teacher's text
        pytest.skip(f"stored on {stored['machine']}, retrained on {fresh['machine']}: the "
                    f"curve's bits are compared on the storing machine only")
    assert fresh["curve"] == stored["curve"]


@pytest.mark.slow
@pytest.mark.parametrize("task_name", STUDY_TASKS)
def test_the_committed_tables_are_a_replay_of_the_committed_runs(task_name, tmp_path):
    """Every committed NAME.md, NAME.grid.md and verdicts.md is what `compare --task TASK
    --no-train` writes from the committed runs: no table is left behind when a later sitting
    changes a task's Holm family or a row's choice."""
    cfg = CompareConfig(task=task_name)
    cache = RunCache(tmp_path / "none.jsonl", [COMMITTED / task_name / "runs.jsonl"], train=False)
    for name, text in table_files(cfg, study(cfg, cache)).items():
        assert (COMMITTED / task_name / name).read_text() == text, (
            f"{task_name}/{name} differs from a replay: run python -m fslora_min compare "
            f"--task {task_name} --no-train --out results/compare")
