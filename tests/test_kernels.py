"""The Triton sketched-LoRA linear against a float64 reference, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on small shapes; the
same tests run compiled on a GPU. Every buffer a kernel writes starts as NaN, so an element it
never writes fails the comparison. Inputs are fresh random numbers, never zeros.

Tolerances are on the relative Frobenius error ||out - ref|| / ||ref||, per dtype:
- fp32: 1e-5. fp32 products and sums in a different order than float64; on a GPU the kernels
  use exact fp32 dots unless torch's own TF32 switch is on (kernels/matmul.py).
- bf16: 2e-2. The inputs are bf16 for both sides, so only the kernel's own rounding counts:
  the shrunk u and g (T, k) are stored in bf16 (relative error 2^-9 each), and so are y and the
  gradients (2^-9 again); gemm='merged' rounds the merged weight W0 + c B[:, I] A[I] to bf16
  instead of u; a few such roundings, each ~4e-3, add up to well under 2e-2.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import fslora_min.lora as lora
from fslora_min.model import TEST_CONFIG, Transformer, lm_loss
from fslora_min.sketch import sample_module_sketches
from kernels import lora_linear
from kernels import matmul
from kernels.lora_linear import GEMM_CHOICES
from kernels.reference import lora_linear_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (leading dims of x, n, m, r, k): none a multiple of the block sizes unless noted.
SHAPES = [
    ((3, 5), 19, 23, 6, 1),  # k = 1, odd everything
    ((37,), 33, 17, 12, 12),  # k = r, r not a power of two
    ((2, 3, 7), 40, 48, 24, 5),  # three leading dims, k not a power of two
]
# gemm='tma' needs 16-byte aligned rows (n, m multiples of 8); still ragged against the tiles
TMA_SHAPES = [
    ((3, 5), 24, 40, 6, 1),
    ((37,), 32, 16, 12, 12),
    ((2, 3, 7), 40, 48, 24, 5),
]
CASES = [(g, s) for g in ("pointer", "cublas", "merged") for s in SHAPES] + \
    [("tma", s) for s in TMA_SHAPES]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element left unwritten fails the comparison."""
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(matmul, "new_output", nan_output)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_inputs(lead, n, m, r, k, dtype, bias, noncontig, seed=0):
    """Random x (lead..., n), W0, bias, B, A and an unsorted index set of k of the r ranks."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, transpose=False):
        if transpose:  # same values, stored transposed: a non-contiguous view
            return torch.randn(*shape[::-1], generator=g).to(dtype).t().to(DEVICE)
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    x = torch.randn(*lead, 2 * n, generator=g).to(dtype).to(DEVICE)
    x = x[..., ::2] if noncontig else x[..., :n].contiguous()  # a strided view, or dense
    weight = rand(m, n, transpose=noncontig) / n ** 0.5
    b = rand(m) if bias else None
    lora_B, lora_A = rand(m, r, transpose=noncontig), rand(r, n, transpose=noncontig)
    index = torch.randperm(r, generator=g)[:k].to(DEVICE)  # any order
    return x, weight, b, lora_B, lora_A, index


def check_against_float64(x, weight, b, lora_B, lora_A, index, scale, dtype, gemm="pointer"):
    """Forward and the gradients of x, B and A, with backend='triton' vs float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_B, lora_A)]
    y = lora_linear(leaves[0], weight, b, leaves[1], leaves[2], index, scale, backend="triton",
                    gemm=gemm)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    y.backward(dy)

    ref_leaves = [t.detach().double().requires_grad_() for t in (x, lora_B, lora_A)]
    y_ref = lora_linear_reference(ref_leaves[0], weight.double(),
                                  None if b is None else b.double(), ref_leaves[1],
                                  ref_leaves[2], index, scale)
    y_ref.backward(dy.double())
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < TOL[dtype], "forward"
    for name, leaf, ref in zip(("x", "B", "A"), leaves, ref_leaves):
        assert leaf.grad.shape == ref.grad.shape, name
        assert rel_err(leaf.grad, ref.grad) < TOL[dtype], f"grad of {name}"
    return leaves


@pytest.mark.parametrize("gemm,shape", CASES, ids=[f"{g}-k{s[4]}-r{s[3]}" for g, s in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "strided"])
def test_sketched_matches_float64(gemm, shape, dtype, bias, noncontig):
    """'strided': x a strided view (gemm='tma' copies it once), W0, B and A stored transposed."""
    lead, n, m, r, k = shape
    inputs = make_inputs(lead, n, m, r, k, dtype, bias, noncontig)
    index = inputs[-1]
    _, grad_B, grad_A = (t.grad for t in check_against_float64(*inputs, 0.75, dtype, gemm))
    unselected = torch.ones(r, dtype=torch.bool, device=DEVICE)
    unselected[index] = False
    assert torch.all(grad_B[:, unselected] == 0) and torch.all(grad_A[unselected] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("gemm,n,m", [("pointer", 21, 18), ("cublas", 21, 18), ("merged", 21, 18),
                                      ("tma", 24, 16)])
def test_compact_form_matches_float64(dtype, k, gemm, n, m):
    """index=None: the client's own b (m, k), a (k, n), every column used, grads of shape k."""
    x, weight, b, lora_b, lora_a, _ = make_inputs((29,), n, m, k, k, dtype, True, False)
    check_against_float64(x, weight, b, lora_b, lora_a, None, 1.5, dtype, gemm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tma_copies_an_x_that_starts_off_the_16_byte_grid(dtype):
    """x a dense view one element into its storage: TMA cannot describe it, so it is copied."""
    x, weight, b, lora_B, lora_A, index = make_inputs((13,), 24, 16, 6, 3, dtype, True, False)
    shifted = torch.empty(x.numel() + 1, dtype=dtype, device=DEVICE)[1:].view_as(x)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    check_against_float64(shifted, weight, b, lora_B, lora_A, index, 1.25, dtype, "tma")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tma_refuses_unaligned_rows(dtype):
    """An odd n leaves x's and W0's rows off the 16-byte grid TMA needs: a ValueError naming the
    strides, never a silent fallback."""
    x, weight, b, lora_B, lora_A, index = make_inputs((5,), 19, 24, 6, 2, dtype, True, False)
    with pytest.raises(ValueError, match=r"gemm='tma' needs x .* strides \(19, 1\)"):
        lora_linear(x, weight, b, lora_B, lora_A, index, 1.0, backend="triton", gemm="tma")


@pytest.mark.parametrize("split", [1, 2, 5])
def test_skinny_split_paths_agree(split):
    """The split reduction (fp32 partials summed after) gives the unsplit result."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(45, 70, generator=g).to(DEVICE)
    factor = torch.randn(9, 70, generator=g).to(DEVICE)
    index = torch.tensor([4, 0, 7], device=DEVICE)
    out = matmul.skinny_matmul(p, factor, index, 0, 0.5, torch.float32, split=split)
    ref = 0.5 * p.double() @ factor.double()[index].t()
    assert rel_err(out, ref) < TOL[torch.float32]


def test_index_order_does_not_matter():
    """A permuted index set is the same sketch: the same y up to summation order."""
    x, weight, b, lora_B, lora_A, index = make_inputs((13,), 20, 22, 10, 4, torch.float32,
                                                      True, False)
    y1 = lora_linear(x, weight, b, lora_B, lora_A, index, 2.0, backend="triton")
    y2 = lora_linear(x, weight, b, lora_B, lora_A, index.flip(0), 2.0, backend="triton")
    torch.testing.assert_close(y1, y2)


def _bad_inputs():
    x, weight, b, lora_B, lora_A, index = make_inputs((4,), 8, 6, 5, 2, torch.float32, True,
                                                      False)
    good = dict(x=x, weight=weight, bias=b, lora_B=lora_B, lora_A=lora_A, index=index, scale=1.0)
    return [
        ("x must have shape", dict(good, x=x[:, :7])),
        ("bias must have shape", dict(good, bias=b[:5])),
        ("lora_B must be", dict(good, lora_B=lora_B[:, :4])),
        ("index out of range", dict(good, index=torch.tensor([0, 5], device=DEVICE))),
        ("index out of range", dict(good, index=torch.tensor([-1], device=DEVICE))),
        ("index must hold between 1", dict(good, index=index[:0])),
        ("index must be a 1-D int64", dict(good, index=index.int())),
        ("has dtype torch.float64", dict(good, lora_A=lora_A.double())),
        ("but x has torch.float32", dict(good, weight=weight.bfloat16())),
        ("scale must be a finite", dict(good, scale=float("inf"))),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("message,kwargs", _bad_inputs(), ids=[m for m, _ in _bad_inputs()])
def test_bad_inputs_raise_naming_the_value(backend, message, kwargs):
    with pytest.raises(ValueError, match=message):
        lora_linear(**kwargs, backend=backend)


@pytest.mark.parametrize("option", [dict(backend="cuda"), dict(gemm="cutlass")],
                         ids=["backend", "gemm"])
def test_unknown_backend_or_gemm_raises(option):
    x, weight, b, lora_B, lora_A, index = make_inputs((4,), 8, 6, 5, 2, torch.float32, True,
                                                      False)
    with pytest.raises(ValueError, match=repr(next(iter(option.values())))):
        lora_linear(x, weight, b, lora_B, lora_A, index, 1.0, **option)


def test_frozen_weight_is_enforced():
    x, weight, b, lora_B, lora_A, index = make_inputs((4,), 8, 6, 5, 2, torch.float32, True,
                                                      False)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight.requires_grad_(), b, lora_B, lora_A, index, 1.0, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU routing only")
def test_cpu_routing():
    """'auto' on CPU is the reference; 'triton' on CPU without the interpreter says why not."""
    code = ("import os; os.environ['TRITON_INTERPRET'] = '0'\n"
            "import torch; from kernels import lora_linear\n"
            "x, w = torch.randn(3, 4), torch.randn(5, 4)\n"
            "B, A = torch.randn(5, 2), torch.randn(2, 4)\n"
            "lora_linear(x, w, None, B, A, None, 1.0, backend='auto')\n"
            "try:\n    lora_linear(x, w, None, B, A, None, 1.0, backend='triton')\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert "RAISED backend='triton' needs CUDA tensors" in out.stdout, out.stderr


@pytest.mark.parametrize("gemm", GEMM_CHOICES)
@pytest.mark.parametrize("mode", ["sketched", "compact"])
def test_training_step_matches_torch_backend(mode, gemm, triton_calls):
    """One real step of the tiny transformer: same loss and LoRA gradients on both backends,
    the Triton layers built with one `gemm` (and every kernel call made with it)."""
    torch.manual_seed(0)
    base = Transformer(TEST_CONFIG)
    models = {}
    for backend in ("torch", "triton"):
        models[backend] = copy.deepcopy(base)
        names = lora.apply_lora(models[backend], r=6, alpha=12.0, backend=backend, gemm=gemm)
        models[backend].to(DEVICE)
    with torch.no_grad():  # B = 0 at init would hide A's gradient: make both factors random
        for _, module in lora.lora_modules(models["torch"]):
            module.lora_B.normal_()
    models["triton"].load_state_dict(models["torch"].state_dict())
    sketches = sample_module_sketches(names, 6, 4, torch.Generator().manual_seed(3))
    tokens = torch.randint(0, TEST_CONFIG.vocab_size, (2, TEST_CONFIG.context + 1),
                           generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = {}
    for backend, model in models.items():
        modules = dict(lora.lora_modules(model))
        if mode == "sketched":
            params = [p for m in modules.values() for p in (m.lora_B, m.lora_A)]
            context = lora.sketched(model, sketches)
        else:
            factors = {name: lora.CompactFactors(
                modules[name].lora_B[:, sk.index.to(DEVICE)].detach().clone().requires_grad_(),
                modules[name].lora_A[sk.index.to(DEVICE)].detach().clone().requires_grad_(), sk)
                for name, sk in sketches.items()}
            params = [p for f in factors.values() for p in (f.b, f.a)]
            context = lora.compact_factors(model, factors)
        with context:
            loss = lm_loss(model, tokens[:, :-1], tokens[:, 1:])
        grads = torch.autograd.grad(loss, params)
        results[backend] = (loss, grads)
    assert triton_calls and set(triton_calls) == {gemm}
    loss_t, grads_t = results["torch"]
    loss_k, grads_k = results["triton"]
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads_t)  # every module got a real gradient
    for g_k, g_t in zip(grads_k, grads_t):
        torch.testing.assert_close(g_k, g_t, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: compiled tile sizes")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,m", [(520, 1032), (1024, 768)], ids=["ragged", "even"])
@pytest.mark.parametrize("gemm", GEMM_CHOICES)
def test_gpu_sizes_match_float64(dtype, n, m, gemm):
    """Shapes large enough for the GPU's real tiles and split reductions; the 'even' one takes
    the unmasked K loop (K a multiple of BLOCK_K) both ways."""
    inputs = make_inputs((3, 333), n, m, 64, 24, dtype, True, m == 1032)
    check_against_float64(*inputs, 0.5, dtype, gemm)
