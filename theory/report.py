"""Checks and tables shared by the theory scripts: measured vs predicted, their ratio, PASS/FAIL.

Every script builds a list of `Check`s, prints them with `print_checks`, and returns
`exit_code(checks)` from its `main`, so `python -m theory.<name>` exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

RELATIONS = ("<=", ">=", "==")


@dataclass
class Check:
    """One comparison: `measured <relation> predicted`, with a relative tolerance `rtol`.

    '<=' and '>=' are inequalities of the theory (measured may not exceed / fall short of the
    prediction by more than rtol); '==' is an identity (|measured - predicted| <= rtol*|predicted|,
    or <= atol when predicted is 0).
    """

    name: str
    measured: float
    predicted: float
    relation: str = "<="
    rtol: float = 1e-9
    atol: float = 0.0
    note: str = ""  # printed after the status, e.g. a confidence interval
    # True when it holds by how the quantities are made (gamma set from gamma_max, a constant
    # measured as the max the inequality needs, an algebraic identity): it tests the code, not
    # the theory, and the tables say so
    construction: bool = False

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        self.measured, self.predicted = float(self.measured), float(self.predicted)

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted if self.predicted != 0 else math.nan

    @property
    def ok(self) -> bool:
        m, p = self.measured, self.predicted
        if not (math.isfinite(m) and math.isfinite(p)):
            return False
        slack = self.rtol * abs(p) + self.atol
        if self.relation == "<=":
            return m <= p + slack
        if self.relation == ">=":
            return m >= p - slack
        return abs(m - p) <= slack


def print_checks(title: str, checks: list[Check]) -> None:
    """A fixed-width table: check | measured | relation | predicted | ratio | status."""
    width = max([len(c.name) for c in checks] + [5])
    print(f"\n== {title} ==")
    print(f"{'check':<{width}}  {'measured':>12}    {'predicted':>12}  {'ratio':>9}  status")
    for c in checks:
        note = "; ".join(x for x in ("[by construction]" if c.construction else "", c.note) if x)
        print(f"{c.name:<{width}}  {c.measured:12.5g} {c.relation:>2} {c.predicted:12.5g}  "
              f"{c.ratio:9.4g}  {'ok' if c.ok else 'FAIL':<4}  {note}")
    if any(c.construction for c in checks):
        print("[by construction]: holds by how its two sides are made (a step set from the "
              "condition, a constant measured where the inequality needs it, an identity); its "
              "ratio is not an empirical agreement")


def exit_code(checks: list[Check]) -> int:
    """0 when every check holds, 1 otherwise (printing the failures)."""
    failed = [c for c in checks if not c.ok]
    built = sum(c.construction for c in checks)
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed ({built} of them by "
          f"construction)")
    for c in failed:
        print(f"FAIL: {c.name}: measured {c.measured:.6g} {c.relation} predicted {c.predicted:.6g}")
    return 1 if failed else 0


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring, with the common arguments below."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    return parser


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """--quick, --seed and --figures, which every theory script takes."""
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a few seconds: what the tests run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generator (default 0)")
    parser.add_argument("--figures", default=os.path.join(os.path.dirname(__file__), "figures"),
                        help="folder for the PNG figures (default theory/figures)")


def save_figure(fig, folder: str, name: str) -> str:
    """Write `fig` as folder/name (PNG) and close it; returns the path."""
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def setup(seed: int) -> torch.Generator:
    """float64 everywhere, one thread (the problems are tiny: threads only add overhead), and one
    seeded generator for all the script's randomness: the same seed gives the same numbers."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    return torch.Generator().manual_seed(seed)


def block_pattern(name: str) -> re.Pattern:
    """The text between `<!-- theory:NAME -->` and `<!-- /theory:NAME -->` in a README."""
    return re.compile(rf"(<!-- theory:{name} -->\n)(.*?)(<!-- /theory:{name} -->)", re.S)


def update_readme_blocks(path: str, blocks: dict[str, str]) -> None:
    """Rewrite each named block of the file at `path` (every one must be there) in place."""
    with open(path) as f:
        text = f.read()
    for name, body in blocks.items():
        if not block_pattern(name).search(text):
            raise ValueError(f"{path} has no <!-- theory:{name} --> block")
        text = block_pattern(name).sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
    with open(path, "w") as f:
        f.write(text)
