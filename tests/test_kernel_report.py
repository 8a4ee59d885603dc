"""kernels/report.py: the tables drawn from a bench JSON, and kernels/README.md's agreement with
the committed GPU run."""

import json
import random

import pytest
import torch

from kernels import bench, report
from kernels.lora_linear import GEMM_CHOICES, GEMMS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cells(table: str) -> list[list[str]]:
    """The body rows of a Markdown table, split into stripped cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


PASSING = ["pointer", "tma", "merged"]  # the ways of GEMM_CHOICES that fake_run leaves intact


@pytest.fixture(scope="module")
def fake_run():
    """A bench result made by the bench's own code (correctness gates, every way, every part)
    at two tiny shapes (one with T > 2 m): each timed call runs once and is given a random time
    in place of do_bench's, and the cublas way is broken so that its gate fails."""
    rng = random.Random()
    pointer = GEMMS["pointer"]

    def run_once(fn, grad_to_none=None):
        fn()
        return rng.uniform(0.1, 2.0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "median_ms", run_once)
        mp.setitem(GEMMS, "cublas", lambda *args: 1.1 * pointer(*args))
        ceilings = {"gemm_tflops": rng.uniform(1, 9), "copy_gbps": rng.uniform(1, 9)}
        rows = [bench.bench_case(T, 32, m, 8, ceilings, None, list(GEMM_CHOICES), device=DEVICE)
                for T, m in ((24, 48), (112, 40))]
    return {"gpu": "a test GPU", "torch": torch.__version__, "triton": "x", "dtype": "bfloat16",
            "ceilings": ceilings, "goals": bench.GOALS, "rows": rows}


def test_the_bench_gates_every_way_and_times_every_part(fake_run):
    for row in fake_run["rows"]:
        assert set(row["fused"]) == set(GEMM_CHOICES)
        broken = row["fused"]["cublas"]["error"]
        assert broken.startswith("GateFailed: correctness gate failed")
        for gemm in PASSING:
            fused = row["fused"][gemm]
            assert all(e < 2e-2 for e in fused["rel_err_vs_fp32"].values()), fused
            parts = ({"part_merge"} if gemm == "merged"
                     else {"part_fused_gemm", "part_fused_gemm_dx"})
            assert fused["a_fwd_over_base"] > 0 and parts <= set(fused["ms"]), gemm
        shared = {"base_dx", "part_shrink", "part_shrink_dy", "part_grad_A", "part_grad_B"}
        assert shared <= set(row["ms"])


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
        assert "cublas" not in line[6]
        assert line[7] == ("merged" if row["T"] > 2 * row["m"] else "fused step")


def test_failed_ways_are_named_and_left_out_of_the_tables(fake_run):
    lines = report.failures(fake_run)
    assert len(lines) == 2 and all("gemm=cublas: GateFailed" in line for line in lines)
    assert "FAILED T=24 n=32 m=48 k=8 gemm=cublas" in report.run_summary(fake_run)
    assert {run["gemm"] for run in report.load_runs(fake_run)} == set(PASSING)


def test_parts_table_has_every_shared_part_and_each_ways_own(fake_run):
    table = report.parts_table(fake_run)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    rows = [dict(zip(header, r)) for r in cells(table)]
    assert len(rows) == 2 * len(PASSING) and "one factor grad" not in header  # an old run's part, absent here
    for row in rows:
        assert all(row[label] != "-" for key, label in report.PARTS if label in header)
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
