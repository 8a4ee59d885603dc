"""kernels/report.py: the tables drawn from a bench JSON, the decision rule, kernels/README.md's
agreement with the committed GPU run, and `kernels.gpu_check --dry` end to end."""

import copy
import itertools
import json
import random
import sys

import pytest
import torch

from kernels import bench, gpu_check, report
from kernels.fused import GEMM_CHOICES, GEMMS

pytestmark = pytest.mark.slow  # runs the bench's gates and gpu_check under the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cells(table: str) -> list[list[str]]:
    """The body rows of a Markdown table, split into stripped cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


PASSING = ["pointer", "merged"]  # the ways of GEMM_CHOICES that fake_run leaves intact


def run_once(fn, grad_to_none=None):
    """A timer for the tests: runs the call once and makes up a time."""
    fn()
    return random.uniform(0.1, 2.0)


@pytest.fixture(scope="module")
def fake_run():
    """A bench result made by the bench's own code (correctness gates, every way, every part)
    at two tiny shapes (one with T > 2 m): each timed call runs once and is given a random time
    in place of do_bench's, and the tma way is broken so that its gate fails."""
    pointer = GEMMS["pointer"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(GEMMS, "tma", lambda *args: 1.1 * pointer(*args))
        ceilings = {"gemm_tflops": random.uniform(1, 9), "gemm_size": 8,
                    "copy_gbps": random.uniform(1, 9)}
        rows = [bench.bench_case(T, 32, m, 8, ceilings, None, list(GEMM_CHOICES), device=DEVICE,
                                 timer=run_once)
                for T, m in ((24, 48), (112, 40))]
    return {"gpu": "a test GPU", "torch": torch.__version__, "triton": "x", "dtype": "bfloat16",
            "ceilings": ceilings, "goals": bench.GOALS, "goal_shape": [24, 32, 48, 8],
            "rows": rows}


def test_the_bench_gates_every_way_and_times_every_part(fake_run):
    for row in fake_run["rows"]:
        assert set(row["fused"]) == set(GEMM_CHOICES) == {"pointer", "tma", "merged"}
        broken = row["fused"]["tma"]["error"]
        assert broken.startswith("GateFailed: correctness gate failed")
        for gemm in PASSING:
            fused = row["fused"][gemm]
            assert all(e < 2e-2 for e in fused["rel_err_vs_fp32"].values()), fused
            parts = ({"part_merge"} if gemm == "merged"
                     else {"part_fused_gemm", "part_fused_gemm_dx"})
            assert fused["a_fwd_over_base"] > 0 and parts <= set(fused["ms"]), gemm
        shared = {"base_dx", "part_shrink", "part_shrink_dy", "part_grad_A", "part_grad_B"}
        assert shared <= set(row["ms"])


def test_the_bench_records_the_config_each_autotuned_kernel_chose(fake_run):
    for row in fake_run["rows"]:
        assert set(row["configs"]) == {"shrink", "grad_A"}
        assert all(c.startswith("BLOCK_Q=") for c in row["configs"].values())
        gemm = row["fused"]["pointer"]["configs"]
        assert set(gemm) == {"gemm_fwd", "gemm_dx"}
        assert all(c.startswith("BLOCK_T=") and "warps=" in c for c in gemm.values())
        assert row["fused"]["merged"]["configs"] == {}  # cuBLAS only: nothing autotuned


def test_goal_table_holds_every_passing_way_with_its_ratios(fake_run):
    table = cells(report.goal_table(fake_run))
    assert table[-1][5:9] == [f"{op} {v}" for op, v in bench.GOALS.values()]
    body = {(int(r[0]), int(r[2]), r[4]): r for r in table[:-1]}
    assert set(body) == {(T, m, g) for T, m in ((24, 48), (112, 40)) for g in PASSING}
    for row in fake_run["rows"]:
        for gemm in PASSING:
            ms = row["fused"][gemm]["ms"]
            a = ms["fused_fwd"] / row["ms"]["base_fwd"]
            b = ms["fused_fwdbwd"] / row["ms"]["base_fwdbwd"]
            c = row["ms"]["eager_fwdbwd"] / ms["fused_fwdbwd"]
            assert body[row["T"], row["m"], gemm][5:9] == [f"{a:.2f}", f"{b:.2f}", f"{c:.2f}", "-"]


def test_fastest_table_picks_the_least_time_and_states_the_count_rule(fake_run):
    table = cells(report.fastest_table(fake_run))
    for row, line in zip(fake_run["rows"], table):
        times = {g: f["ms"]["fused_fwdbwd"] for g, f in row["fused"].items() if "error" not in f}
        best = min(times, key=times.get)
        assert line[4:6] == [best, f"{times[best]:.3f}"]
        assert "tma" not in line[6]
        assert line[7] == ("merged" if row["T"] > 2 * row["m"] else "fused step")


def test_failed_ways_are_named_and_left_out_of_the_tables(fake_run):
    lines = report.failures(fake_run)
    assert len(lines) == 2 and all("gemm=tma: GateFailed" in line for line in lines)
    assert "FAILED T=24 n=32 m=48 k=8 gemm=tma" in report.run_summary(fake_run)
    assert {run["gemm"] for run in report.load_runs(fake_run)} == set(PASSING)


def test_parts_table_has_every_shared_part_and_each_ways_own(fake_run):
    table = report.parts_table(fake_run)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    rows = [dict(zip(header, r)) for r in cells(table)]
    assert len(rows) == 2 * len(PASSING)
    assert not any(label.startswith("part_") for label in header)  # every part has its label
    for row in rows:
        assert all(row[label] != "-" for label in report.PARTS.values() if label in header)
        own, other = (("merge", "GEMM fwd") if row["gemm"] == "merged" else ("GEMM fwd", "merge"))
        assert row[own] != "-" and row[other] == "-"


def test_readme_blocks_are_rewritten_in_place_and_a_missing_one_is_named(fake_run):
    text = "intro <!-- report:source old.json -->\n" + "".join(
        f"<!-- report:{n} -->\nold\n<!-- /report:{n} -->\nmid\n" for n in report.TABLES)
    new = report.update_readme(text, fake_run, "results/new.json")
    assert report.readme_blocks(new) == {n: t(fake_run) for n, t in report.TABLES.items()}
    assert report.readme_source(new) == report.ROOT / "results/new.json"
    assert new.startswith("intro <!-- report:source results/new.json -->\n")
    assert new.count("mid\n") == len(report.TABLES)
    without = text.replace("report:fastest", "report:other")
    with pytest.raises(ValueError, match="report:fastest"):
        report.update_readme(without, fake_run, "x.json")
    partial = report.update_readme(without, fake_run, "x.json", required=("ranges",))
    assert set(report.readme_blocks(partial)) == set(report.TABLES) - {"fastest"}
    with pytest.raises(ValueError, match="report:source PATH"):
        report.update_readme(text.replace("report:source", "source"), fake_run, "x.json")


def test_default_json_needs_exactly_one_gpu_run(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "bench_cpu.json").write_text("{}")
    with pytest.raises(ValueError, match=r"found \[\]"):
        report.default_json()
    for name in ("bench_A.json", "bench_B.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match="bench_A.json"):
        report.default_json()


@pytest.mark.parametrize("readme", list(report.READMES),
                         ids=lambda p: str(p.relative_to(report.ROOT)))
def test_readmes_show_the_committed_gpu_run(readme):
    """Every figure in a README's report blocks is that of the committed JSON it names."""
    text = readme.read_text()
    committed = json.loads(report.readme_source(text).read_text())
    blocks = report.readme_blocks(text)
    assert set(report.READMES[readme]) <= set(blocks)
    assert blocks == {name: report.TABLES[name](committed) for name in blocks}, (
        f"{readme} differs from the bench JSON: run `python -m kernels.report --readme`")


def test_goal_ranges_give_each_ways_span_and_how_often_each_goal_is_met(fake_run):
    lines = report.goal_ranges(fake_run).splitlines()
    assert [line.split("`")[1] for line in lines] == PASSING
    for line, gemm in zip(lines, PASSING):
        values = [row["fused"][gemm]["b_fwdbwd_over_base"] for row in fake_run["rows"]]
        met = sum(v <= 1.15 for v in values)
        assert (f"(b) {min(values):.2f}-{max(values):.2f} (goal <= 1.15, met at {met} of 2)"
                in line)
        assert "(d)" not in line  # no compiled baseline in this run


def with_gemm_share(run: dict, share: float) -> dict:
    """fake_run with the pointer GEMM at `share` of cuBLAS's speed, fwd and dx, at the goal."""
    run = copy.deepcopy(run)
    goal = run["rows"][0]
    for own, base in (("part_fused_gemm", "base_fwd"), ("part_fused_gemm_dx", "base_dx")):
        goal["fused"]["pointer"]["ms"][own] = goal["ms"][base] / share
    return run


def with_times(run: dict, times: list[dict[str, float]]) -> dict:
    """fake_run with the given fwd+bwd times per shape ('torch': the eager path's)."""
    run = copy.deepcopy(run)
    for row, shape_times in zip(run["rows"], times):
        for way, ms in shape_times.items():
            if way == "torch":
                row["ms"]["eager_fwdbwd"] = ms
            else:
                row["fused"][way]["ms"]["fused_fwdbwd"] = ms
    return run


def test_decision_takes_the_fastest_passing_way_even_below_the_old_95_percent_gate(fake_run):
    """pointer's GEMM at 94% of cuBLAS's (the old rule left it out for the byte rule) but the
    fastest fwd+bwd measured: it is the default; merged is fastest at the second shape."""
    run = with_times(with_gemm_share(fake_run, 0.94), [
        {"pointer": 1.0, "merged": 2.0, "torch": 3.0},
        {"pointer": 2.0, "merged": 1.0, "torch": 3.0}])
    assert report.gemm_shares(run) == {"pointer": pytest.approx(0.94)}
    assert [d["way"] for d in report.decide(run)] == ["pointer", "merged"]
    table = report.decision_table(run)
    assert "(goal 95%; not part of the rule): `pointer` 94%" in table
    assert "failed its gate or did not run: tma" in table


def test_decision_keeps_torch_within_the_margin_and_never_takes_a_failed_way(fake_run):
    inside = 1 - report.MARGIN / 2  # faster than torch, but by less than the margin
    run = with_times(fake_run, [{"pointer": inside, "merged": 1.5, "torch": 1.0},
                                {"pointer": 0.5, "merged": 2.0, "torch": 1.0}])
    run["rows"][1]["fused"]["pointer"] = {"error": "GateFailed: ..."}  # fastest, but failed
    decided = report.decide(run)
    assert [d["way"] for d in decided] == ["torch", "torch"]
    assert "within the 5% margin" in decided[0]["why"]
    run["rows"][1]["fused"]["tma"] = {"ms": {"fused_fwdbwd": 0.9}}  # passed, 10% faster
    assert report.decide(run)[1]["way"] == "tma"


def test_the_bench_gate_runs_on_poisoned_outputs_and_the_timing_does_not(monkeypatch):
    """The gate's call sees kernels/matmul.py's POISON set (an unwritten tile is NaN); the
    timed calls after it run as training does."""
    from kernels import matmul
    seen, pointer = [], GEMMS["pointer"]
    monkeypatch.setitem(GEMMS, "pointer",
                        lambda *args: (seen.append(matmul.POISON), pointer(*args))[1])
    bench.bench_case(24, 32, 48, 8, {"gemm_tflops": 1.0, "gemm_size": 8, "copy_gbps": 1.0},
                     None, ["pointer"], device=DEVICE, timer=run_once)
    assert len(seen) > 2 and seen[0] != seen[0] and seen[1] != seen[1]  # NaN: fwd, dx
    assert matmul.POISON is None and all(p is None for p in seen[2:])


@pytest.fixture
def dry_check(tmp_path, monkeypatch):
    """gpu_check --dry's steps in this process: a quick test selection and one tiny shape; the
    rows the JSON held at each write."""
    monkeypatch.setattr(gpu_check, "TESTS", ["tests/test_kernels.py", "-k", "unknown_backend"])
    monkeypatch.setattr(gpu_check, "DRY_SHAPES", [(40, 16, 16, 4)])
    monkeypatch.setattr(gpu_check, "wall_ms", run_once)
    writes, write = [], bench.write
    monkeypatch.setattr(bench, "write", lambda result, path: (writes.append(
        len(result["rows"])), write(result, path)))
    return tmp_path / "out", writes


def test_gpu_check_dry_writes_json_log_and_decision_under_out_after_every_step(dry_check,
                                                                               capsys):
    out, writes = dry_check
    result = gpu_check.check(dry=True, out=out, budget_s=600)
    saved = json.loads((out / "gpu_check.json").read_text())
    assert writes == [0, 0, 1, 1] and saved == json.loads(json.dumps(result))
    assert sorted(p.name for p in out.iterdir()) == ["decision.md", "gpu_check.json",
                                                    "gpu_check.log"]
    assert result["tests"]["returncode"] == 0 and "2 passed" in result["tests"]["summary"]
    assert [[r[d] for d in "Tnmk"] for r in result["rows"]] == [[40, 16, 16, 4]]
    assert len(result["clocks"]) == 2 and result["goal_shape"] == [40, 16, 16, 4]
    table = report.decision_table(result)
    assert table in capsys.readouterr().out and table in (out / "gpu_check.log").read_text()
    assert (out / "decision.md").read_text() == table + "\n"
    assert saved["decision"] == report.decide(result)
    text = "<!-- report:source x.json -->\n" + "".join(
        f"<!-- report:{n} -->\n<!-- /report:{n} -->\n" for n in report.TABLES)
    assert report.readme_blocks(report.update_readme(text, result, "x.json")) == {
        n: table(result) for n, table in report.TABLES.items()}


def no_tests(interpret, timeout_s):
    return {"returncode": 0, "summary": "", "seconds": 0}


def test_gpu_check_starts_no_shape_past_its_budget(dry_check, monkeypatch):
    out, writes = dry_check
    monkeypatch.setattr(gpu_check, "run_tests", no_tests)
    result = gpu_check.check(dry=True, out=out, budget_s=1e-9)
    assert result["rows"] == [] and result["skipped_shapes"] == [[40, 16, 16, 4]]


def test_gpu_check_stops_inside_a_shape_when_the_budget_runs_out(dry_check, monkeypatch):
    """The budget runs out after the shape's third timed call: the shape is cut there, listed
    as skipped, and the next one never starts."""
    out, _ = dry_check
    monkeypatch.setattr(gpu_check, "run_tests", no_tests)
    monkeypatch.setattr(gpu_check, "DRY_SHAPES", [(40, 16, 16, 4), (24, 16, 16, 4)])
    calls = []
    monkeypatch.setattr(bench, "CLOCK", itertools.count().__next__)  # one tick a reading
    monkeypatch.setattr(gpu_check, "wall_ms", lambda fn, grad_to_none=None: (
        calls.append(1), run_once(fn))[1])
    result = gpu_check.check(dry=True, out=out, budget_s=4)  # start 0; the shape starts at 1
    assert result["rows"] == [] and result["skipped_shapes"] == [[40, 16, 16, 4], [24, 16, 16, 4]]
    assert len(calls) == 2 + 3  # the two ceilings, then three of the shape's timed calls


def test_gpu_check_stops_a_test_run_past_its_timeout():
    done = gpu_check.subprocess_step([sys.executable, "-c", "import time; time.sleep(30)"],
                                     {}, 1.0, "sleep")
    assert done["returncode"] == "timeout" and done["seconds"] < 10
