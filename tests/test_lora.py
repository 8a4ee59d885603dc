"""The LoRA layer against dense float64 references, in all three modes; merge/unmerge; wrapping."""

import itertools

import pytest
import torch
import torch.nn as nn

from fslora_min.lora import (CompactFactors, LoRALinear, apply_lora, compact_factors,
                             lora_modules, lora_scale, sketched)
from fslora_min.model import TEST_CONFIG, Transformer
from fslora_min.sketch import Sketch, sample_sketch


def random_layer(m: int, n: int, r: int, seed: int, rslora: bool = False) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n, m).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64))
        base.bias.copy_(torch.randn(m, generator=g, dtype=torch.float64))
    layer = LoRALinear(base, r, alpha=3.0, rslora=rslora, backend="torch", generator=g)
    with torch.no_grad():  # non-zero B, so the LoRA term is tested, not just the base
        layer.lora_B.copy_(torch.randn(m, r, generator=g, dtype=torch.float64))
    return layer


def dense_reference(layer: LoRALinear, x: torch.Tensor, sketch: Sketch | None) -> torch.Tensor:
    """x (W0 + s B S A)^T + bias with S a dense diagonal matrix (identity when no sketch)."""
    S = torch.diag(sketch.diagonal()) if sketch else torch.eye(layer.r, dtype=torch.float64)
    W = layer.weight + layer.scale * layer.lora_B @ S @ layer.lora_A
    return x @ W.T + layer.bias


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("k", [None, 1, 3, 5])
def test_forward_and_gradients_match_dense_float64(rslora, k):
    m, n, r = 7, 5, 5
    layer = random_layer(m, n, r, seed=k or 0, rslora=rslora)
    sketch = None if k is None else sample_sketch(r, k, torch.Generator().manual_seed(1))
    x = torch.randn(3, 4, n, dtype=torch.float64, requires_grad=True)
    if sketch is None:
        y = layer(x)
    else:
        with sketched(nn.ModuleDict({"l": layer}), {"l": sketch}):
            y = layer(x)
    expected_scale = 3.0 / r ** 0.5 if rslora else 3.0 / r
    assert layer.scale == pytest.approx(expected_scale)
    B, A = (p.detach().clone().requires_grad_() for p in (layer.lora_B, layer.lora_A))
    x2 = x.detach().clone().requires_grad_()
    S = torch.diag(sketch.diagonal()) if sketch else torch.eye(r, dtype=torch.float64)
    y_ref = x2 @ (layer.weight + layer.scale * B @ S @ A).T + layer.bias
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-12, atol=1e-12)
    if sketch is not None:  # ranks outside I get exactly zero gradient
        outside = torch.ones(r, dtype=torch.bool)
        outside[sketch.indices] = False
        assert torch.all(layer.lora_B.grad[:, outside] == 0)
        assert torch.all(layer.lora_A.grad[outside] == 0)


def test_compact_mode_equals_sketched_mode():
    layer = random_layer(6, 4, 6, seed=3)
    sketch = Sketch(torch.tensor([4, 0, 2]), 6)  # any order
    x = torch.randn(5, 4, dtype=torch.float64)
    wrap = nn.ModuleDict({"l": layer})
    with sketched(wrap, {"l": sketch}):
        y_sketched = layer(x)
    f = CompactFactors(layer.lora_B[:, sketch.indices].detach(),
                       layer.lora_A[sketch.indices].detach(), sketch)
    with compact_factors(wrap, {"l": f}):
        y_compact = layer(x)
    torch.testing.assert_close(y_compact, y_sketched, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_sketched, dense_reference(layer, x, sketch).detach())


def test_sketched_mode_leaves_the_index_check_to_the_sketch(monkeypatch):
    """The Sketch checked its index when it was made; the layer must not ask the kernel path to
    check it again on every forward (on a GPU that check reads the index back: a sync)."""
    import fslora_min.lora as lora_module
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("check_index", True))
        return real(*args, **kwargs)

    real = lora_module.lora_linear
    monkeypatch.setattr(lora_module, "lora_linear", spy)
    layer = random_layer(6, 4, 6, seed=3)
    with sketched(nn.ModuleDict({"l": layer}), {"l": Sketch(torch.tensor([4, 0, 2]), 6)}):
        layer(torch.randn(5, 4, dtype=torch.float64))
    assert calls == [False]


def test_layer_equals_its_base_at_init():
    base = nn.Linear(9, 6)
    layer = LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(3, 9)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_merge_then_unmerge_restores_weights_and_output():
    layer = random_layer(6, 5, 3, seed=4)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.train(), layer.eval()  # no side effect: still merged, weights unchanged
    assert layer.merged
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_apply_lora_finds_modules_by_type_and_freezes_everything_else():
    model = Transformer(TEST_CONFIG)
    names = apply_lora(model, r=3, alpha=6.0, targets=("q", "v", "fc"))
    assert names == [n for n, _ in lora_modules(model)]
    assert names == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.0.mlp.fc"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{f}" for m in names for f in "AB"}
    with pytest.raises(ValueError, match="nope"):
        apply_lora(Transformer(TEST_CONFIG), r=2, alpha=1.0, targets=("nope",))


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_rank_must_be_positive_integer(bad):
    with pytest.raises(ValueError, match=f"r={bad}"):
        LoRALinear(nn.Linear(3, 3), r=bad, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        lora_scale(float("nan"), 4)


def test_sketch_over_wrong_rank_or_missing_module_is_rejected():
    model = Transformer(TEST_CONFIG)
    names = apply_lora(model, r=4, alpha=4.0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="r=4"):
        with sketched(model, {n: sample_sketch(5, 2, g) for n in names}):
            pass
    with pytest.raises(ValueError, match="missing"):
        with sketched(model, {names[0]: sample_sketch(4, 2, g)}):
            pass
    assert all(m.mode is None for _, m in lora_modules(model))


def test_every_index_set_is_equally_likely_and_expected_sketch_is_identity():
    """E[S] = I by exact enumeration: each k-subset once, weight 1 / C(r, k)."""
    for r, k in [(5, 2), (6, 3), (4, 4), (7, 1)]:
        subsets = list(itertools.combinations(range(r), k))
        mean = sum(Sketch(torch.tensor(s), r).diagonal() for s in subsets) / len(subsets)
        torch.testing.assert_close(torch.diag(mean), torch.eye(r, dtype=torch.float64),
                                   rtol=1e-14, atol=1e-14)
