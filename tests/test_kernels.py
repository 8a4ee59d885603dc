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
from kernels import lora_linear, matmul, matmul_tma, skinny
from kernels.fused import GEMM_CHOICES
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
CASES = [(g, s) for g in ("pointer", "merged") for s in SHAPES] + \
    [("tma", s) for s in TMA_SHAPES]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element left unwritten fails the comparison."""
    monkeypatch.setattr(matmul, "POISON", float("nan"))


# Each Triton kernel and the arguments it writes through. A scattering reduce writes only the
# ranks I of a zero-filled full-size gradient: the other ranks must stay exact zeros (checked
# in test_sketched_matches_float64), and the ranks I are compared with float64.
KERNEL_OUTPUTS = {skinny._skinny_kernel: ("out_ptr",), skinny._shrink_dy_kernel: ("g_ptr",
                  "part_ptr"), skinny._reduce_kernel: ("out_ptr",),
                  matmul._fused_linear_kernel: ("y_ptr",),
                  matmul_tma._fused_linear_tma_kernel: ("y_desc",)}


@pytest.fixture
def kernel_launches(monkeypatch) -> list[tuple[str, bool]]:
    """(kernel, whether every buffer it writes was all NaN at launch) for each launch."""
    launches = []
    for kernel, outputs in KERNEL_OUTPUTS.items():
        def spy(*args, grid, warmup, kernel=kernel, outputs=outputs, run=kernel.run, **kwargs):
            named = {**dict(zip(kernel.arg_names, args)), **kwargs}
            if named.get("SCATTER"):
                poisoned = None  # writes into a zero-filled gradient (see KERNEL_OUTPUTS)
            else:
                buffers = [getattr(named[o], "base", named[o]) for o in outputs]
                poisoned = all(bool(torch.isnan(b).all()) for b in buffers)
            launches.append((getattr(kernel, "base_fn", kernel.fn).__name__, poisoned))
            return run(*args, grid=grid, warmup=warmup, **kwargs)
        monkeypatch.setattr(kernel, "run", spy)
    return launches


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
@pytest.mark.parametrize("gemm,n,m", [("pointer", 21, 18), ("merged", 21, 18), ("tma", 24, 16)])
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
def test_split_reductions_give_the_unsplit_result(split):
    """fp32 partials over 1, 2 or 5 splits of the reduction, added up by reduce_partials (scaled
    and scattered to the ranks I, or not), give scale * P F[:, I]; so do shrink_dy's g and dB
    over its token ranges."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(45, 70, generator=g).to(DEVICE)
    factor = torch.randn(9, 70, generator=g).to(DEVICE)
    index = torch.tensor([4, 0, 7], device=DEVICE)
    ref = 0.5 * p.double() @ factor.double()[index].t()  # (45, 3)
    parts = skinny.skinny_partials(p, factor, index, 0, split=split)
    assert parts.shape[0] == split
    compact = skinny.reduce_partials(parts, 0.5, torch.empty(45, 3, device=DEVICE), 1)
    scattered = skinny.reduce_partials(parts, 0.5, torch.zeros(9, 45, device=DEVICE), 0, index)
    assert rel_err(compact, ref) < TOL[torch.float32]
    assert rel_err(scattered[index].t(), ref) < TOL[torch.float32]
    assert torch.all(scattered[[1, 2, 3, 5, 6, 8]] == 0)

    dy, u = p.t()[:, :33], torch.randn(70, 3, generator=g).to(DEVICE)  # dy (T, m), u (T, k)
    lora_B = factor[:, :33].t()  # (m, r), a transposed view
    g_out, dB_parts = skinny.shrink_dy(dy, lora_B, index, 0.5, u, split=split)
    assert dB_parts.shape[0] == split
    dB = skinny.reduce_partials(dB_parts, 1.0, torch.empty(33, 3, device=DEVICE), 1)
    assert rel_err(g_out, 0.5 * dy.double() @ lora_B.double()[:, index]) < TOL[torch.float32]
    assert rel_err(dB, dy.double().t() @ u.double()) < TOL[torch.float32]


@pytest.mark.parametrize("gemm", GEMM_CHOICES)
@pytest.mark.parametrize("mode", ["sketched", "compact"])
def test_every_kernel_output_starts_poisoned(gemm, mode, kernel_launches):
    """A spy on every Triton kernel's launches: each buffer a kernel writes in full came from
    new_output and was all NaN when the kernel started, on every path of forward and backward."""
    x, weight, b, lora_B, lora_A, index = make_inputs((9,), 24, 16, 6, 3, torch.float32, True,
                                                      False)
    if mode == "compact":
        lora_B, lora_A, index = lora_B[:, index].contiguous(), lora_A[index].contiguous(), None
    leaves = [t.requires_grad_() for t in (x, lora_B, lora_A)]
    lora_linear(*leaves[:1], weight, b, *leaves[1:], index, 0.5, backend="triton",
                gemm=gemm).sum().backward()
    names = {name for name, _ in kernel_launches}
    expected = {"_shrink_dy_kernel", "_skinny_kernel", "_reduce_kernel"}
    expected |= {"pointer": {"_fused_linear_kernel"}, "tma": {"_fused_linear_tma_kernel"},
                 "merged": set()}[gemm]
    assert names == expected
    assert all(poisoned is not False for _, poisoned in kernel_launches), kernel_launches
    unscattered = [p for _, p in kernel_launches if p is not None]
    assert len(unscattered) == len(kernel_launches) - (2 if mode == "sketched" else 0)


def test_backward_is_deterministic():
    """Two runs on the same inputs give the same bits: no float atomics, fixed-order sums."""
    x, weight, b, lora_B, lora_A, index = make_inputs((37,), 20, 17, 6, 3, torch.float32, True,
                                                      False)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_B, lora_A)]
        y = lora_linear(leaves[0], weight, b, *leaves[1:], index, 0.75, backend="triton")
        y.backward(torch.cos(y.detach()))
        runs.append([y] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("gemm", ["pointer", "tma"])
def test_autotune_key_holds_layout_and_dtype(gemm, monkeypatch):
    """The forward of (n, m) = (a, b) and the dx of (n, m) = (b, a) have the same sizes T, N, K,
    k: their autotune keys differ by W's layout only, and hold the dtype."""
    kernel = {"pointer": matmul._fused_linear_kernel,
              "tma": matmul_tma._fused_linear_tma_kernel}[gemm]
    monkeypatch.setattr(kernel, "configs", kernel.configs * 2)  # a real choice: keys are kept
    monkeypatch.setattr(kernel, "cache", {})
    fn = matmul.fused_linear if gemm == "pointer" else matmul_tma.fused_linear_tma
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
    w_a, w_b = torch.randn(32, 24, generator=g), torch.randn(24, 32, generator=g)  # W0 (m, n)
    u, factor, index = torch.randn(16, 2, generator=g), torch.randn(32, 4, generator=g), \
        torch.tensor([1, 3])
    fn(x, w_a.t(), None, u, factor, index, 1)  # forward of n = 24, m = 32: W = W0^T
    fn(dy, w_b, None, u, factor.t(), index, 0)  # dx of n = 32, m = 24: W = W0
    keys = list(kernel.cache)
    assert len(keys) == 2 and all("torch.float32" in key for key in keys)
    differ = [i for i, (a, b) in enumerate(zip(*keys)) if a != b]
    assert [kernel.keys[i] for i in differ] == (["W_LAYOUT"] if gemm == "pointer" else ["W_NK"])


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
    good = dict(x=x, weight=weight, bias=b, lora_B=lora_B, lora_A=lora_A, index=index,
                client_scale=1.0)
    return [
        ("x must have shape", dict(good, x=x[:, :7])),
        ("bias must have shape", dict(good, bias=b[:5])),
        ("lora_B must be", dict(good, lora_B=lora_B[:, :4])),
        ("index out of range", dict(good, index=torch.tensor([0, 5], device=DEVICE))),
        ("index out of range", dict(good, index=torch.tensor([-1], device=DEVICE))),
        ("index must hold distinct ranks", dict(good, index=torch.tensor([1, 3, 1],
                                                                         device=DEVICE))),
        ("index must hold between 1", dict(good, index=index[:0])),
        ("index must be a 1-D int64", dict(good, index=index.int())),
        ("has dtype torch.float64", dict(good, lora_A=lora_A.double())),
        ("but x has torch.float32", dict(good, weight=weight.bfloat16())),
        ("client_scale must be a finite", dict(good, client_scale=float("inf"))),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("message,kwargs", _bad_inputs(), ids=[m for m, _ in _bad_inputs()])
def test_bad_inputs_raise_naming_the_value(backend, message, kwargs):
    with pytest.raises(ValueError, match=message):
        lora_linear(**kwargs, backend=backend)


@pytest.mark.parametrize("option", [dict(backend="cuda"), dict(gemm="cublas")],
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
                modules[name].lora_B[:, sk.indices.to(DEVICE)].detach().clone().requires_grad_(),
                modules[name].lora_A[sk.indices.to(DEVICE)].detach().clone().requires_grad_(), sk)
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
    x, weight, b, lora_B, lora_A, index = make_inputs((3, 333), n, m, 64, 24, dtype, True,
                                                      m == 1032)
    lora_A.mul_(n ** -0.5)  # as the bench draws it: else the LoRA term is ~80x the base GEMM's
    # and a missing base (1-3% of y) would pass bf16's 2e-2
    check_against_float64(x, weight, b, lora_B, lora_A, index, 0.5, dtype, gemm)
