"""Test setup shared by the suite.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported (triton.jit reads TRITON_INTERPRET when it decorates a kernel). A value
the user set is kept; on a CUDA machine the kernels run compiled.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's models are tiny: one thread is fastest, and it keeps the timings of a busy
# machine sane (idle worker threads spinning on two cores slowed tiny runs tenfold).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses some tests start
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # the optional Flower extra: no usage events


@pytest.fixture
def triton_calls(monkeypatch) -> list[str]:
    """The `gemm` of every call into the Triton kernel path (kernels.dispatch), in order."""
    from kernels import dispatch  # after TRITON_INTERPRET is set above

    calls, kernel = [], dispatch.lora_linear_triton

    def spy(*args):
        calls.append(args[-1])  # lora_linear_triton(x, ..., scale, gemm)
        return kernel(*args)

    monkeypatch.setattr(dispatch, "lora_linear_triton", spy)
    return calls
