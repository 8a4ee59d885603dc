"""Tables from a `kernels.bench` or `kernels.gpu_check` JSON:
`python -m kernels.report [JSON] [--readme]`.

Prints, in Markdown, what kernels/README.md shows of a GPU run:
- `goal_ranges`: per way, each ratio's range over the shapes against its goal (also in the
  project's README.md);
- `goal_table`: ratios (a)-(d) per shape and way against the goals, with useful TFLOP/s;
- `parts_table`: where the time goes, every part timed alone (base GEMMs, LoRA passes, each
  way's own GEMM in both layouts or its merge);
- `fastest_table`: per shape, the fastest way forward+backward next to the way the byte counts
  pick (`rule_way`: merge when T > 2 m);
- `decision_table`: the default way per shape by the decision rule (`decide`).
With `--readme` it rewrites the blocks between `<!-- report:NAME -->` and `<!-- /report:NAME -->`
in kernels/README.md and README.md, and their `<!-- report:source PATH -->` marker, so every
figure there comes from the JSON named; tests/test_kernel_report.py fails when a committed
README and that JSON disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "kernels"
RATIOS = ("a_fwd_over_base", "b_fwdbwd_over_base", "c_eager_over_fused", "d_compiled_over_fused")


def default_json() -> Path:
    """The one GPU bench run under results/kernels/ (bench_cpu.json, a CPU run, holds no GPU
    figures)."""
    found = sorted(p for p in RESULTS.glob("bench_*.json") if p.name != "bench_cpu.json")
    if len(found) != 1:
        raise ValueError(f"expected one GPU bench JSON in {RESULTS}, found "
                         f"{[p.name for p in found]}: name one")
    return found[0]


def load_runs(bench: dict) -> list[dict]:
    """One record per (shape, way) that passed its gate: the shape's baseline times joined with
    the way's own figures, and `gemm` naming the way."""
    return [{**row, **fused, "gemm": gemm, "ms": {**row["ms"], **fused["ms"]}}
            for row in bench["rows"] for gemm, fused in row["fused"].items()
            if "error" not in fused]


def failures(bench: dict) -> list[str]:
    """One line per (shape, way) that failed to compile, launch or pass its gate."""
    return [f"T={row['T']} n={row['n']} m={row['m']} k={row['k']} gemm={gemm}: {fused['error']}"
            for row in bench["rows"] for gemm, fused in row["fused"].items() if "error" in fused]


def rule_way(T: int, m: int) -> str:
    """The byte counts' choice: the merge (4 m n bytes) beats the shrink (2 T n) when T > 2 m."""
    return "merged" if T > 2 * m else "fused step"


def meets(value: float, goal: tuple[str, float]) -> bool:
    """Whether a ratio meets its goal, given as (op, bound) with op '<=' or '>='."""
    op, bound = goal
    return value <= bound if op == "<=" else value >= bound


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _ms(times: dict, key: str) -> str:
    return f"{times[key]:.3f}" if key in times else "-"


def goal_ranges(bench: dict) -> str:
    """Per way: each ratio's range over the shapes, and at how many of them its goal is met."""
    runs, lines = load_runs(bench), []
    for gemm in dict.fromkeys(run["gemm"] for run in runs):
        spans = []
        for q, label in zip(RATIOS, "abcd"):
            values = [run[q] for run in runs if run["gemm"] == gemm and q in run]
            if not values:
                continue
            op, goal = bench["goals"][q]
            met = sum(meets(v, (op, goal)) for v in values)
            spans.append(f"({label}) {min(values):.2f}-{max(values):.2f} (goal {op} {goal}, "
                         f"met at {met} of {len(values)})")
        lines.append(f"- `{gemm}`: " + "; ".join(spans))
    return "\n".join(lines)


def goal_table(bench: dict) -> str:
    """Ratios (a)-(d) of every (shape, way), the goals in the last row."""
    rows = []
    for run in load_runs(bench):
        rates = [f"{run[name]['tflops']:.0f} ({run[name]['share_gemm_rate']:.0%})"
                 for name in ("fused_fwd", "fused_fwdbwd")]
        rows.append([str(run[d]) for d in "Tnmk"] + [run["gemm"]]
                    + [_ratio(run.get(q)) for q in RATIOS] + rates)
    goals = [f"{op} {value}" for op, value in (bench["goals"][q] for q in RATIOS)]
    rows.append(["goal", "", "", "", ""] + goals + ["", ""])
    return markdown(["T", "n", "m", "k", "gemm", "(a) fwd / F.linear", "(b) fwd+bwd / base",
                     "(c) eager / fused", "(d) compiled / fused", "fused fwd TFLOP/s",
                     "fused fwd+bwd TFLOP/s"], rows)


def run_summary(bench: dict) -> str:
    """The run's device, versions and measured ceilings, and each way's error range."""
    c = bench["ceilings"]
    lines = [f"- {bench['gpu']}, torch {bench['torch']}, Triton {bench['triton']}, "
             f"{bench['dtype']}, r = {bench['rows'][0]['r']}; measured in the same run: GEMM "
             f"{c['gemm_tflops']:.0f} TFLOP/s ({c['gemm_size']}^3, random data), copy "
             f"{c['copy_gbps']:.0f} GB/s (read + write)"]
    runs = load_runs(bench)
    for gemm in dict.fromkeys(run["gemm"] for run in runs):
        errs = [run["rel_err_vs_fp32"] for run in runs if run["gemm"] == gemm]
        spans = ", ".join(f"{name} {min(e[name] for e in errs):.1e} to "
                          f"{max(e[name] for e in errs):.1e}" for name in errs[0])
        lines.append(f"- `{gemm}`: relative error vs the fp32 reference {spans}")
    lines += [f"- FAILED {line}" for line in failures(bench)]
    return "\n".join(lines)


PARTS = {"base_fwd": "F.linear", "base_fwdbwd": "F.linear fwd+bwd", "base_dx": "dy W0",
         "part_shrink": "shrink x", "part_shrink_dy": "g, dB from dy", "part_grad_A": "dA",
         "part_grad_B": "dB reduce"}
WAY_PARTS = {"part_fused_gemm": "GEMM fwd", "part_fused_gemm_dx": "GEMM dx",
             "part_merge": "merge", "fused_fwd": "fwd", "fused_fwdbwd": "fwd+bwd"}


def parts_table(bench: dict) -> str:
    """Milliseconds of every part timed alone, per shape and way (- where a run did not time
    it); a part this module has no label for shows under its JSON key."""
    runs = load_runs(bench)
    timed = dict.fromkeys(key for run in runs for key in run["ms"])
    shared = [key for key in {**PARTS, **timed} if key in timed and key not in WAY_PARTS
              and (key in PARTS or key.startswith("part_"))]
    own = [key for key in WAY_PARTS if key in timed]
    rows = [[str(run[d]) for d in "Tnmk"] + [run["gemm"]]
            + [_ms(run["ms"], key) for key in shared + own] for run in runs]
    labels = [{**PARTS, **WAY_PARTS}.get(key, key) for key in shared + own]
    return markdown(["T", "n", "m", "k", "gemm"] + labels, rows)


def fastest_table(bench: dict) -> str:
    """Per shape: the fastest way forward+backward, its time, the others', and the count rule's
    pick."""
    rows = []
    for row in bench["rows"]:
        timed = {gemm: f["ms"]["fused_fwdbwd"] for gemm, f in row["fused"].items()
                 if "error" not in f}
        if not timed:
            continue
        best = min(timed, key=timed.get)
        others = ", ".join(f"{g} {t / timed[best]:.2f}x" for g, t in timed.items() if g != best)
        rows.append([str(row[d]) for d in "Tnmk"]
                    + [best, f"{timed[best]:.3f}", others or "(the only way timed)",
                       rule_way(row["T"], row["m"])])
    return markdown(["T", "n", "m", "k", "fastest fwd+bwd", "ms", "others (times the fastest)",
                     "count rule"], rows)


# The decision rule (kernels/README.md). The default way per shape is the fastest measured
# forward+backward among the ways that passed their correctness gate there and the PyTorch
# path ('torch'); a way other than 'torch' must beat it by MARGIN, so that a measured tie
# keeps the path that needs no compiled kernel. The goals (ratios (a)-(d), a Triton GEMM at
# GEMM_SHARE_GOAL of cuBLAS's speed) are reported beside it, not part of it.
TRITON_GEMMS = ("pointer", "tma")
MARGIN = 0.05  # a way replaces 'torch' only at <= (1 - MARGIN) of its time
GEMM_SHARE_GOAL = 0.95
GOAL_SHAPE = (8192, 4096, 4096, 16)  # (T, n, m, k); a run may name its own as "goal_shape"


def gemm_shares(bench: dict) -> dict[str, float]:
    """{Triton way: cuBLAS's time / its GEMM's time} at the goal shape, the smaller of forward
    and dx where both were timed; ways that failed there or did not run are absent."""
    goal = tuple(bench.get("goal_shape", GOAL_SHAPE))
    shares = {}
    for row in bench["rows"]:
        if tuple(row[d] for d in "Tnmk") != goal:
            continue
        for gemm in TRITON_GEMMS:
            ms = {**row["ms"], **row["fused"].get(gemm, {}).get("ms", {})}
            pairs = [(base, own) for base, own in (("base_fwd", "part_fused_gemm"),
                                                   ("base_dx", "part_fused_gemm_dx"))
                     if base in ms and own in ms]
            if pairs and "error" not in row["fused"][gemm]:
                shares[gemm] = min(ms[base] / ms[own] for base, own in pairs)
    return shares


def decide(bench: dict) -> list[dict]:
    """The default way of every shape of a run by the decision rule, and why."""
    out = []
    for row in bench["rows"]:
        torch_ms = row["ms"]["eager_fwdbwd"]
        passed = {g: f["ms"]["fused_fwdbwd"] for g, f in row["fused"].items() if "error" not in f}
        best = min(passed, key=passed.get, default=None)
        failed = sorted(set(row["fused"]) - set(passed))
        left_out = f"; failed its gate or did not run: {', '.join(failed)}" if failed else ""
        if best is not None and passed[best] <= (1 - MARGIN) * torch_ms:
            way = best
            why = f"{best} {passed[best] / torch_ms:.2f}x torch's fwd+bwd, the fastest"
        else:
            way = "torch"
            why = ("the fastest fwd+bwd" if best is None or passed[best] >= torch_ms else
                   f"{best} at {passed[best] / torch_ms:.2f}x is within the {MARGIN:.0%} margin")
        out.append({**{d: row[d] for d in "Tnmk"}, "way": way, "why": why + left_out})
    return out


def decision_table(bench: dict) -> str:
    """The default way per shape (`decide`), after the Triton GEMMs' speed at the goal shape
    (a goal, reported apart from the rule)."""
    goal = tuple(bench.get("goal_shape", GOAL_SHAPE))
    shares = gemm_shares(bench)
    speeds = ", ".join(f"`{g}` {v:.0%}" for g, v in shares.items()) or "none timed"
    head = (f"Triton GEMM speed as a share of cuBLAS's at the goal shape T, n, m, k = "
            f"{', '.join(map(str, goal))} (goal {GEMM_SHARE_GOAL:.0%}; not part of the rule): "
            f"{speeds}\n\n")
    rows = [[str(d[key]) for key in "Tnmk"] + [d["way"], d["why"]] for d in decide(bench)]
    return head + markdown(["T", "n", "m", "k", "default way", "why"], rows)


TABLES = {"run": run_summary, "ranges": goal_ranges, "goals": goal_table, "parts": parts_table,
          "fastest": fastest_table, "decision": decision_table}


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- report:{name} -->\n)(.*?)(<!-- /report:{name} -->)", re.S)


# the READMEs that show the run, and the blocks each must have
READMES = {ROOT / "kernels" / "README.md": tuple(TABLES), ROOT / "README.md": ("ranges",)}


SOURCE = re.compile(r"<!-- report:source (\S*) -->")  # the JSON a README's blocks come from


def readme_source(text: str) -> Path:
    """The bench JSON named by a README's source marker; ValueError if it names none."""
    m = SOURCE.search(text)
    if m is None or not m.group(1):
        raise ValueError("no <!-- report:source PATH --> marker naming the bench JSON")
    return ROOT / m.group(1)


def readme_blocks(text: str) -> dict[str, str]:
    """{table name: the text between its markers} of a README."""
    return {name: m.group(2).removesuffix("\n") for name in TABLES
            if (m := block(name).search(text))}


def update_readme(text: str, bench: dict, source: str,
                  required: tuple[str, ...] = tuple(TABLES)) -> str:
    """`text` with every marked block replaced by its table from `bench` and the source marker
    naming `source` (a path under the repository); raises if the marker or one of `required` is
    missing."""
    if not SOURCE.search(text):
        raise ValueError("no <!-- report:source PATH --> marker to fill")
    text = SOURCE.sub(f"<!-- report:source {source} -->", text)
    for name, table in TABLES.items():
        if not block(name).search(text):
            if name in required:
                raise ValueError(f"no <!-- report:{name} --> block to fill")
            continue
        text = block(name).sub(lambda m: m.group(1) + table(bench) + "\n" + m.group(3), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, nargs="?", default=None,
                        help="a kernels.bench result (default: the one GPU run in results/kernels)")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite the marked tables of kernels/README.md and README.md "
                             "instead of printing")
    args = parser.parse_args()
    path = (args.json or default_json()).resolve()
    bench = json.loads(path.read_text())
    if args.readme:
        for readme, required in READMES.items():
            text = update_readme(readme.read_text(), bench, str(path.relative_to(ROOT)), required)
            readme.write_text(text)
            print(f"rewrote the tables of {readme} from {path}")
        return
    for name, table in TABLES.items():
        print(f"\n{name}:\n{table(bench)}")


if __name__ == "__main__":
    main()
