"""Build the tutorial notebooks from their sources and execute them, with no Jupyter installed.

Each notebook has a plain-text source, `tutorials/src/NN_name.py`, in the "percent" format
(`# %% [markdown]` starts a markdown cell whose lines begin with `# `; `# %%` a code cell).
This script turns a source into `tutorials/NN_name.ipynb` (nbformat 4), runs its code cells in
order in one namespace, in a fresh Python process (like a fresh kernel), and saves what each
cell printed, its last expression's value, and every matplotlib figure it drew (as a PNG) as
the cell's outputs, so the figures show when the notebook is opened on a code host.

    python tutorials/run_notebooks.py               # build and execute all six, save outputs
    python tutorials/run_notebooks.py 03 05         # only notebooks whose name starts so
    python tutorials/run_notebooks.py --fast 02     # FSLORA_FAST=1 sizes; nothing is saved
    python tutorials/run_notebooks.py --execute tutorials/02_sketching.ipynb --fast
                                                    # run a committed notebook's cells as they are

`--fast` sets FSLORA_FAST=1: the notebooks shrink their sizes (tests/test_tutorials.py runs
every notebook so). The committed outputs come from the full mode. Only the standard library,
matplotlib and the project's own dependencies are needed: the notebook JSON is written with
`json`, and execution is `exec` of each cell, so a cell that fails stops the run with its
traceback and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
FAST_ENV = "FSLORA_FAST"  # "1": the small sizes the tests use


def notebook_names() -> list[str]:
    """Stems of every tutorial source, in order: ['01_lora', '02_sketching', ...]."""
    return sorted(p.stem for p in SOURCES.glob("[0-9][0-9]_*.py"))


def parse_source(text: str) -> list[tuple[str, str]]:
    """(cell_type, source) pairs of a percent-format file; markdown lines lose their '# '."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"text before the first '# %%' marker: {line!r}")
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            bad = [ln for ln in lines if ln and not ln.startswith("#")]
            if bad:
                raise ValueError(f"markdown cell line without '#': {bad[0]!r}")
            lines = [ln[2:] if ln.startswith("# ") else ln[1:] for ln in lines]
        out.append((kind, "\n".join(lines).strip("\n")))
    return out


def _lines(text: str) -> list[str]:
    """Jupyter's multi-line string form: a list of lines, each but the last ending in '\\n'."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def make_notebook(cells: list[tuple[str, str]]) -> dict:
    """An nbformat-4 notebook (no outputs yet) from (cell_type, source) pairs."""
    nb_cells = []
    for kind, src in cells:
        cell = {"cell_type": kind, "metadata": {}, "source": _lines(src)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        nb_cells.append(cell)
    return {"cells": nb_cells, "nbformat": 4, "nbformat_minor": 4,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"},
                         "language_info": {"name": "python", "version": sys.version.split()[0]}}}


def code_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


# ---------------------------------------------------------------- execution (in the child process)

def _figure_outputs() -> list[dict]:
    """Every open matplotlib figure as a PNG display_data output; the figures are then closed."""
    import matplotlib.pyplot as plt

    outputs = []
    for num in plt.get_fignums():
        fig = plt.figure(num)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                                 "text/plain": [f"<Figure size {fig.bbox.width:.0f}x"
                                                f"{fig.bbox.height:.0f} with "
                                                f"{len(fig.axes)} Axes>"]}})
    plt.close("all")
    return outputs


def run_cell(src: str, ns: dict, label: str) -> tuple[list[dict], object]:
    """exec one cell in `ns`; returns its outputs (stdout, stderr, figures) and its last value."""
    tree = ast.parse(src, filename=label)
    last = None
    shown = not src.rstrip().endswith(";")  # as in Jupyter, a trailing ';' hides the value
    if shown and tree.body and isinstance(tree.body[-1], ast.Expr):  # shown like Jupyter's
        last = ast.Expression(tree.body.pop().value)
    out, err = io.StringIO(), io.StringIO()
    value = None
    with redirect_stdout(out), redirect_stderr(err):
        exec(compile(tree, label, "exec"), ns)
        if last is not None:
            value = eval(compile(last, label, "eval"), ns)
    outputs = [{"output_type": "stream", "name": name, "text": _lines(buf.getvalue())}
               for name, buf in (("stdout", out), ("stderr", err)) if buf.getvalue()]
    return outputs + _figure_outputs(), value


def skeleton(line: str) -> str:
    """A printed line with its numbers (and lists of them) and booleans as '#': what stays the
    same from one run to another of the same code, at any size (padding included)."""
    line = re.sub(r"\b(True|False)\b|[-+]?\d+(\.\d*)?(e[-+]?\d+)?", "#", line)
    return re.sub(r"\s*#(\s*[,x]?\s*#)*\s*", "#", line).strip()


def printed(outputs: list[dict]) -> set[str]:
    """The skeletons of the non-empty lines a cell printed to stdout."""
    return {skeleton(line) for o in outputs if o.get("name") == "stdout"
            for line in "".join(o["text"]).splitlines() if line.strip()}


def stale_lines(committed: list[dict], fresh: list[dict]) -> list[str]:
    """Lines a cell's committed output printed that its code no longer prints (compared by
    `skeleton`, so a fast run checks a full run's output)."""
    return sorted(printed(committed) - printed(fresh))


def execute(nb: dict, name: str) -> float:
    """Run the notebook's code cells in order in one namespace, filling in their outputs.

    Returns the wall time. On an error, prints the cell and its traceback and exits with 1; a
    cell whose committed output holds a line its code no longer prints (`stale_lines`) is an
    error too, found after every cell ran. Cells are compared up to the first one after the
    setup that reads FAST: from there on the two modes may print other lines.
    """
    import matplotlib

    matplotlib.use("Agg")  # figures go to PNG outputs, never to a window
    ns: dict = {"__name__": "__main__"}
    start, count, times, stale, modes_differ = time.perf_counter(), 0, [], [], False
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        src = "".join(cell["source"])
        tick = time.perf_counter()
        try:
            outputs, value = run_cell(src, ns, f"<{name} cell {count}>")
        except BaseException:
            print(f"{name}: code cell {count} failed:\n{src}\n", file=sys.stderr)
            traceback.print_exc()
            raise SystemExit(1)
        if value is not None:
            outputs.append({"output_type": "execute_result", "execution_count": count,
                            "metadata": {}, "data": {"text/plain": _lines(repr(value))}})
        modes_differ = modes_differ or (count > 1 and "FAST" in src)
        if not modes_differ:
            stale += [f"code cell {count}: {line!r}"
                      for line in stale_lines(cell.get("outputs", []), outputs)]
        cell["execution_count"], cell["outputs"] = count, outputs
        times.append(time.perf_counter() - tick)
    print(f"{name}: seconds per code cell: " + " ".join(f"{t:.1f}" for t in times))
    if stale:
        print(f"{name}: committed output its code no longer prints (rebuild it with python "
              f"tutorials/run_notebooks.py {name[:2]}):\n  " + "\n  ".join(stale),
              file=sys.stderr)
        raise SystemExit(1)
    return time.perf_counter() - start


def execute_file(path: Path, fast: bool, save: bool) -> None:
    """Child-process entry: run one .ipynb from its own folder, as Jupyter would; maybe save it."""
    os.environ[FAST_ENV] = "1" if fast else "0"
    nb = json.loads(path.read_text())
    os.chdir(path.parent)
    seconds = execute(nb, path.stem)
    if save:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    print(f"{path.name}: {seconds:.1f} s ({'fast' if fast else 'full'} mode)"
          f"{', outputs saved' if save else ''}")


# ---------------------------------------------------------------- building (the parent process)

def build(name: str, fast: bool) -> int:
    """Write NN_name.ipynb from its source, then execute it in a fresh process (saving outputs
    unless fast). Returns the child's exit code."""
    path = HERE / f"{name}.ipynb"
    nb = make_notebook(parse_source((SOURCES / f"{name}.py").read_text()))
    if fast:  # never overwrite the committed outputs with fast-mode ones
        path = HERE / f".{name}.fast.ipynb"
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    cmd = [sys.executable, __file__, "--execute", str(path)] + (["--fast"] if fast else [])
    code = subprocess.call(cmd)
    if fast:
        path.unlink()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebook name prefixes (default: all)")
    parser.add_argument("--fast", action="store_true", help=f"{FAST_ENV}=1 sizes; save nothing")
    parser.add_argument("--execute", type=Path, help="run this .ipynb's cells as they are")
    args = parser.parse_args(argv)
    if args.execute:
        execute_file(args.execute.resolve(), args.fast, save=not args.fast)
        return 0
    names = [n for n in notebook_names() if not args.names or n.startswith(tuple(args.names))]
    if not names:
        parser.error(f"no notebook matches {args.names}; have {notebook_names()}")
    failed = [n for n in names if build(n, args.fast) != 0]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
