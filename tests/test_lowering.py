"""What the kernels compile to for an H100 (sm_90), checked without a GPU (kernels/lowering.py).

Every config the autotuner would try, for every kernel launch of the fused layer, must fit the
H100's shared memory and spill no registers, or it would fail to launch or run slowly on the
GPU. In bf16 at the benchmark's shape, every one with a dot must also use Hopper's warpgroup MMA
(wgmma); the TMA GEMM must load through TMA bulk copies only and the other kernels with a dot
through per-thread async copies. fp32 (exact FMA dots unless TF32 is on) is checked at the GPU
test's shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles every kernel config for an H100: minutes

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"bf16": ["--dtype", "bf16"],  # the benchmark's shape (the tool's default)
        "fp32": ["--dtype", "fp32", "--shape", "999", "520", "1032", "24"]}  # test_gpu_sizes


@pytest.fixture(scope="module", params=sorted(RUNS))
def lowering(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lowering") / "lowering.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "kernels.lowering", *RUNS[request.param],
                          "--json", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_tried_config_fits_and_does_not_spill(lowering):
    rows = lowering["rows"]
    assert {r["kernel"] for r in rows} == {"fused_linear", "fused_linear_tma", "shrink",
                                           "skinny_partials", "shrink_dy", "reduce_partials"}
    for r in rows:
        where = f"{lowering['dtype']} {r['kernel']} ({r['layout']}, {r['config']})"
        assert r["shared_bytes"] <= lowering["shared_limit_bytes"], where
        assert r["local_bytes"] == 0, f"{where} spills registers"
        if lowering["dtype"] == "bf16":  # the reduce only adds: no dot, no tensor cores
            assert r["tensor_cores"] == ("none" if r["kernel"] == "reduce_partials"
                                         else "wgmma"), where


def test_tma_gemm_loads_by_tma_and_the_others_by_async_copies(lowering):
    for r in lowering["rows"]:
        if r["kernel"] == "fused_linear_tma":
            assert r["tma_copies"] > 0 and r["async_copies"] == 0, r
        elif r["kernel"] != "reduce_partials":  # a plain loop of loads, nothing to pipeline
            assert r["tma_copies"] == 0 and r["async_copies"] > 0, r
