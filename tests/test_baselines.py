"""Baselines and ablation sketches: equivalences that must hold exactly, the unbiasedness of the
reweighted importance sketch, per-index sketch weights in the LoRA layer, and fair comparison."""

import math

import pytest
import torch
import torch.nn as nn

from fslora_min.client import ClientUpdate
from fslora_min.experiment import run_experiment
from fslora_min.importance import (exact_sketch_mean, importance_sketch, inclusion_probabilities,
                                   systematic_sample, top_k_index)
from fslora_min.lora import CompactFactors, LoRALinear, compact_factors, sketched
from fslora_min.methods import (FlexLoRA, FLoRA, HetLoRA, RescaledHetLoRA, client_products,
                                stack_factors)
from fslora_min.registry import METHODS
from fslora_min.server import Server, ServerConfig
from fslora_min.sketch import Sketch
from tests.test_engine import federation
from tests.tiny import tiny_experiment


def one_layer(m: int, n: int, r: int) -> Server:
    model = nn.ModuleDict({"l": LoRALinear(nn.Linear(n, m).double(), r, alpha=float(r))})
    return Server(model, ServerConfig())


def random_updates(server: Server, method, ks: list[int], sizes: list[int]):
    """Downlinks from `method` and random float64 deltas for clients of ranks ks."""
    g = torch.Generator().manual_seed(3)
    m, n = server.shapes["l"]
    downs, ups = [], []
    for i, (k, size) in enumerate(zip(ks, sizes)):
        down = method.downlink(server, method.sketches(server, k, g))
        db = torch.randn(m, k, dtype=torch.float64, generator=g)
        da = torch.randn(k, n, dtype=torch.float64, generator=g)
        downs.append(down)
        ups.append(ClientUpdate(i, {"l": down["l"].sketch}, {"l": (db, da)}, size, 0))
    return downs, ups


def weighted_products(server: Server, downs, ups) -> torch.Tensor:
    """sum_i p_i s_i B_i A_i written out, p_i = n_i / sum n."""
    total = sum(u.num_examples for u in ups)
    out = 0
    for down, up in zip(downs, ups):
        f, (db, da) = down["l"], up.deltas["l"]
        s_i = server.modules["l"].scale * f.sketch.sketch_weight
        out = out + up.num_examples / total * s_i * (f.b + db) @ (f.a + da)
    return out


def test_flora_stack_equals_weighted_sum_of_products_and_is_merged_into_w0():
    server = one_layer(7, 5, 4)
    method = FLoRA(r=4, seed_generator=torch.Generator().manual_seed(0))
    downs, ups = random_updates(server, method, [1, 3, 4], [10, 30, 20])
    b_st, a_st = stack_factors(server, ups, downs)["l"]
    assert b_st.shape == (7, 8) and a_st.shape == (8, 5)
    expected = weighted_products(server, downs, ups)
    torch.testing.assert_close(b_st @ a_st, expected, rtol=1e-13, atol=1e-13)
    w0 = server.modules["l"].weight.detach().clone()
    method.aggregate(server, ups, downs)
    torch.testing.assert_close(server.modules["l"].weight - w0, expected, rtol=1e-13, atol=1e-13)
    assert method.numbers_down(downs[0]) == 8 * (7 + 5)  # the next round downloads the stack
    assert all(not d["l"].b.any() for d in downs)  # every round starts a fresh LoRA (B = 0)


def test_flexlora_with_k_equal_r_reproduces_the_averaged_product_exactly():
    m, n = 7, 5
    R = min(m, n)  # FlexLoRA's server rank: any m x n update is a rank-R LoRA
    server = one_layer(m, n, R)
    method = FlexLoRA(r=R, seed_generator=torch.Generator().manual_seed(0))
    downs, ups = random_updates(server, method, [R, R], [10, 30])
    expected = weighted_products(server, downs, ups)
    method.aggregate(server, ups, downs)
    torch.testing.assert_close(server.modules["l"].delta_weight(), expected,
                               rtol=1e-12, atol=1e-12)
    f = method.downlink(server, method.sketches(server, R, torch.Generator()))["l"]
    s_i = server.modules["l"].scale * f.sketch.sketch_weight
    torch.testing.assert_close(s_i * f.b @ f.a, expected, rtol=1e-12, atol=1e-12)
    assert client_products(server, ups, downs)["l"].shape == (m, n)


def test_flexlora_sends_the_best_rank_k_approximation():
    server = one_layer(6, 6, 6)
    method = FlexLoRA(r=6, seed_generator=torch.Generator())
    downs, ups = random_updates(server, method, [6, 6], [1, 1])
    method.aggregate(server, ups, downs)
    dw = server.modules["l"].delta_weight().detach()
    f = method.downlink(server, method.sketches(server, 2, torch.Generator()))["l"]
    approx = server.modules["l"].scale * f.sketch.sketch_weight * f.b @ f.a
    sigma = torch.linalg.svdvals(dw)
    err = torch.linalg.matrix_norm(dw - approx) ** 2
    torch.testing.assert_close(err, (sigma[2:] ** 2).sum(), rtol=1e-10, atol=1e-10)  # Eckart-Young


@pytest.mark.parametrize("k", [1, 3, 5])
def test_rescaled_hetlora_client_starts_at_alpha_over_k_on_the_prefix(k):
    """hetlora-rescaled: W0 + (alpha / k) B[:, :k] A[:k, :]; hetlora: the same at alpha / r."""
    m, n, r = 7, 4, 5
    g = torch.Generator().manual_seed(k)
    alpha = 0.5 + 3 * torch.rand(1, generator=g).item()
    layer = LoRALinear(nn.Linear(n, m).double(), r, alpha=alpha, backend="torch", generator=g)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)  # B starts at 0: draw it, or the forward is W0's
    server = Server(nn.ModuleDict({"l": layer}), ServerConfig())
    x = torch.randn(3, n, dtype=torch.float64, generator=g)
    W0, B, A = (t.detach().clone() for t in (layer.weight, layer.lora_B, layer.lora_A))
    for method, scale in ((RescaledHetLoRA(), alpha / k), (HetLoRA(), alpha / r)):
        down = method.downlink(server, method.sketches(server, k, torch.Generator()))
        assert down["l"].sketch.indices.tolist() == list(range(k))
        with torch.no_grad(), compact_factors(server.model, down):
            out = layer(x)
        ref = x @ (W0 + scale * B[:, :k] @ A[:k]).T + layer.bias.detach()  # (3, m)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_rescaled_hetlora_moves_the_numbers_of_hetlora():
    """Only the diagonal value differs: the same prefixes down and the same deltas up."""
    feds = [federation([1, 2, 4], "batched", "sgd", method, "cpu", torch.float64)
            for method in ("hetlora", "hetlora-rescaled")]
    records = [fed.run_round(1) for fed in feds]
    for field in ("numbers_down", "numbers_up", "bytes_down", "bytes_up"):
        assert getattr(records[0], field) == getattr(records[1], field), field
    per_rank = sum(m + n for m, n in feds[0].server.shapes.values())
    assert records[1].numbers_up == [k * per_rank for k in (1, 2, 4)]  # k_i (m + n) per module
    assert records[0].heldout_loss != records[1].heldout_loss  # the scale did act


@pytest.mark.parametrize("r,k", [(6, 1), (6, 3), (8, 5), (5, 5)])
def test_reweighted_importance_sketch_is_exactly_unbiased_by_enumeration(r, k):
    scores = torch.rand(r, generator=torch.Generator().manual_seed(r * 10 + k)) ** 3
    scores[0] = 0.0  # a rank with zero importance must still be drawn sometimes
    pi = inclusion_probabilities(scores, k, uniform_mix=0.3)
    assert math.isclose(pi.sum().item(), k, abs_tol=1e-12) and (pi > 0).all() and (pi <= 1).all()
    torch.testing.assert_close(exact_sketch_mean(pi), torch.ones(r, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    for u in torch.linspace(0, 0.999, 50).tolist():
        assert systematic_sample(pi, u).unique().numel() == k


def test_reweighted_importance_sketch_is_unbiased_by_monte_carlo():
    k, draws = 3, 4000
    scores = torch.tensor([5.0, 0.0, 1.0, 3.0, 0.1, 0.0, 0.0, 2.0])  # r = 8
    pi = inclusion_probabilities(scores, k, uniform_mix=0.2)
    g = torch.Generator().manual_seed(0)
    diags = torch.stack([importance_sketch(scores, k, 0.2, g).diagonal() for _ in range(draws)])
    mean, se = diags.mean(0), diags.std(0) / math.sqrt(draws)  # E[diag S] = 1 per index
    assert ((mean - 1).abs() <= 5 * se).all(), (mean, se)  # ~5 sigma bounds: no flaky failures
    freq, se_f = (diags > 0).double().mean(0), (pi * (1 - pi) / draws).sqrt()
    assert ((freq - pi).abs() <= 5 * se_f + 1e-12).all()  # inclusion frequencies are the pi_j


def test_top_k_takes_the_largest_and_breaks_ties_at_random():
    scores = torch.tensor([0.1, 3.0, 0.2, 2.0, 0.0])
    assert top_k_index(scores, 2, torch.Generator()).tolist() == [1, 3]
    picks = {tuple(top_k_index(torch.zeros(6), 2, torch.Generator().manual_seed(s)).tolist())
             for s in range(20)}
    assert len(picks) > 3  # B = 0 at the start: not always the first ranks


def test_per_index_sketch_weights_match_dense_forward_and_gradients():
    m, n, r = 5, 4, 6
    layer = LoRALinear(nn.Linear(n, m).double(), r, alpha=3.0, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    sk = Sketch(torch.tensor([1, 4, 5]), r, torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64))
    x = torch.randn(2, 3, n, dtype=torch.float64)
    b = layer.lora_B.detach()[:, sk.indices].clone().requires_grad_(True)
    a = layer.lora_A.detach()[sk.indices].clone().requires_grad_(True)
    b_ref, a_ref = b.detach().clone().requires_grad_(True), a.detach().clone().requires_grad_(True)
    dense = layer.weight + layer.scale * b_ref @ torch.diag(sk.per_index) @ a_ref  # W0 + s B S A
    ref = x @ dense.T + layer.bias
    with compact_factors(nn.ModuleDict({"l": layer}), {"l": CompactFactors(b, a, sk)}):
        out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward(), ref.square().sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-12, atol=1e-12)
    with sketched(nn.ModuleDict({"l": layer}), {"l": sk}):
        torch.testing.assert_close(layer(x), ref.detach(), rtol=1e-12, atol=1e-12)


def test_every_method_sees_the_same_participants_and_learns(tmp_path):
    seen, client_ranks = {}, None
    for method in METHODS:
        cfg = tiny_experiment(str(tmp_path), participants=2, rounds=2)
        cfg.method = method
        history, info = run_experiment(cfg, progress=False)
        seen[method] = [rec.participants for rec in history.rounds]
        client_ranks = client_ranks or info["client_ranks"]
        assert info["client_ranks"] == client_ranks
        assert all(math.isfinite(rec.heldout_loss) for rec in history.rounds)
        if method in ("fedavg-min", "ffa-lora", "rolora", "fedex-lora"):  # rank min_i k_i
            assert set(info["trained_ranks"]) == {min(client_ranks)}
            assert info["global_rank"] == min(client_ranks)
        elif method != "fedavg-full":
            assert info["trained_ranks"] == client_ranks
    assert all(p == seen["fslora"] for p in seen.values())
