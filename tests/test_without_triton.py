"""Without Triton (it publishes Linux wheels only): the package imports, a tiny federation runs
on the CPU, and a Triton way asked for says in one line what is missing. Each check runs in a
fresh interpreter whose import system refuses `triton`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TRITON = """
import sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is blocked for this test")
        return None

sys.meta_path.insert(0, NoTriton())
"""


def run_without_triton(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_block_works():
    done = run_without_triton("import triton")
    assert done.returncode != 0 and "triton is blocked for this test" in done.stderr


def test_a_tiny_federation_runs_with_triton_blocked(tmp_path):
    done = run_without_triton(f"""
from fslora_min.cli import main
code = main(["run", "--preset", "tiny", "--rounds", "2", "--no-progress",
             "--out", {str(tmp_path / "run")!r}])
assert code == 0, code
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
""")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "held-out loss" in done.stdout and (tmp_path / "run" / "metrics.json").exists()


def test_a_triton_way_without_triton_is_one_clear_line(tmp_path):
    done = run_without_triton(f"""
from fslora_min.cli import main
main(["run", "--preset", "tiny", "--lora-backend", "triton", "--out", {str(tmp_path)!r}])
""")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("python -m fslora_min run: error: argument --lora-backend: the Triton LoRA "
                    "kernels need the triton package, which is not installed (Linux wheels "
                    "only): use --lora-backend torch")
    assert "Traceback" not in done.stderr
