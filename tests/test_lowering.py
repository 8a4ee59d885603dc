"""What the kernels compile to for an H100 (sm_90), checked without a GPU (kernels/lowering.py).

Every autotuning config of every kernel, at the benchmark's bf16 shape, must use Hopper's
warpgroup MMA (wgmma), fit the H100's shared memory and spill no registers; the TMA GEMM must
load through TMA bulk copies only and the pointer GEMM through per-thread async copies. A config
that broke one of these would be slow or would fail to launch on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lowering(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lowering") / "lowering.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "kernels.lowering", "--json", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_config_uses_wgmma_and_fits(lowering):
    rows = lowering["rows"]
    assert {r["kernel"] for r in rows} == {"fused_linear", "fused_linear_tma", "skinny_matmul"}
    for r in rows:
        where = f"{r['kernel']} ({r['layout']}, {r['config']})"
        assert r["tensor_cores"] == "wgmma", where
        assert r["shared_bytes"] <= lowering["shared_limit_bytes"], where
        assert r["local_bytes"] == 0, f"{where} spills registers"


def test_tma_gemm_loads_by_tma_and_pointer_gemm_does_not(lowering):
    for r in lowering["rows"]:
        if r["kernel"] == "fused_linear_tma":
            assert r["tma_copies"] > 0 and r["async_copies"] == 0, r
        else:
            assert r["tma_copies"] == 0 and r["async_copies"] > 0, r
