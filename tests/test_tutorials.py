"""The tutorial notebooks: each runs top to bottom in fast mode (FSLORA_FAST=1) without Jupyter,
is committed with outputs that match its source, has a markdown cell before every code cell,
and never redefines the library; the README lists every one."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
sys.path.insert(0, str(TUTORIALS))
from run_notebooks import code_cells, notebook_names, parse_source, stale_lines  # noqa: E402

NAMES = notebook_names()


def load(name: str) -> dict:
    return json.loads((TUTORIALS / f"{name}.ipynb").read_text())


def library_names() -> set[str]:
    """Every function and class name defined at top level in fslora_min/, kernels/, theory/."""
    names = set()
    for folder in ("fslora_min", "kernels", "theory"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    names.add(node.name)
    return names


def test_seven_notebooks_listed_in_the_readme():
    assert len(NAMES) == 7
    readme = (TUTORIALS / "README.md").read_text()
    for name in NAMES:
        assert f"{name}.ipynb" in readme


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_source_and_has_outputs(name):
    nb = load(name)
    source = parse_source((TUTORIALS / "src" / f"{name}.py").read_text())
    cells = [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]
    assert cells == source, "the .ipynb is stale: run python tutorials/run_notebooks.py"
    for before, cell in zip(nb["cells"], nb["cells"][1:]):
        if cell["cell_type"] == "code":
            assert before["cell_type"] == "markdown", "a code cell without markdown before it"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert all(c["outputs"] for c in code[:1]), "the setup cell prints the seed and device"
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    assert not any(o["output_type"] == "error" for c in code for o in c["outputs"])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_imports_the_library_and_redefines_none_of_it(name):
    src = "\n".join(code_cells(load(name)))
    assert any(f"from {pkg}" in src for pkg in ("fslora_min", "kernels", "theory"))
    defined = {n.name for n in ast.walk(ast.parse(src))
               if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not any(isinstance(n, ast.ClassDef) for n in ast.walk(ast.parse(src)))
    assert not defined & library_names(), f"redefines library names {defined & library_names()}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name):
    """Runs the committed notebook's code cells in order in one namespace, in a fresh process."""
    proc = subprocess.run([sys.executable, str(TUTORIALS / "run_notebooks.py"), "--execute",
                           str(TUTORIALS / f"{name}.ipynb"), "--fast"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_a_committed_output_its_code_no_longer_prints_is_caught():
    """What the fast run above checks in every cell: 02's cell 3 once kept "scale r/k" after its
    code came to print "sketch weight r/k"; other numbers at other sizes are not staleness."""
    def out(*lines: str) -> list[dict]:
        return [{"output_type": "stream", "name": "stdout", "text": [ln + "\n" for ln in lines]}]

    full = out("I = [0, 4], scale r/k = 4", "r= 6 k=2:  15 index sets; max 2.2e-16")
    fast = out("I = [1, 5, 6], sketch weight r/k = 2.5", "r= 8 k=3:  56 index sets; max 0.0e+00")
    assert stale_lines(full, fast) == ["I = [#], scale r/k =#"]
    assert stale_lines(fast, out("I = [3], sketch weight r/k = 16",
                                 "r=10 k=5: 252 index sets; max 1.1e-16")) == []
