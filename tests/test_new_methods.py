"""The methods published since FSLoRA (fslora_min/rivals.py) and the per-rank
normalizers (fslora_min/server.py): each one's defining exactness property, its reduction to
FedAvg-LoRA where one exists, and what it moves and trains by the one accounting. float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from fslora_min.cli import build_parser, config_from_args
from fslora_min.client import ClientUpdate
from fslora_min.experiment import run_experiment
from fslora_min.lora import LoRALinear, compact_factors, global_factors
from fslora_min.methods import FedAvgLoRA, HetLoRA, Method, RescaledHetLoRA
from fslora_min.registry import METHODS
from fslora_min.rivals import (FLASC, FedExLoRA, FedPLoRA, FFALoRA, RoLoRA, fold_weights,
                               top_k_entries)
from fslora_min.server import AGGREGATIONS, Server, ServerConfig, average_padded_deltas
from fslora_min.sketch import Sketch
from tests.test_engine import federation, rel
from tests.test_reliability import (assert_same_model, final_state, run_cut_in_round,
                                   without_timing)
from tests.tiny import TEST_CONFIG, tiny_experiment, tiny_federation, tiny_lora_model

NEW_METHODS = ("fed-plora", "flasc", "ffa-lora", "rolora", "fedex-lora")


def one_layer(m: int, n: int, r: int, **server) -> Server:
    """One float64 LoRA layer (W0 m x n, B random so that products are not zero)."""
    g = torch.Generator().manual_seed(m * 100 + n * 10 + r)
    layer = LoRALinear(nn.Linear(n, m).double(), r, alpha=2.0 * r, generator=g)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
    return Server(nn.ModuleDict({"l": layer}), ServerConfig(**server))


def same_model(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- Fed-PLoRA


@pytest.mark.parametrize("k", [1, 3, 5, 6])
def test_fed_plora_client_starts_at_exactly_the_global_model_and_fslora_does_not(k):
    r = 6
    server = Server(tiny_lora_model(r).double(), ServerConfig())
    x = torch.randint(0, TEST_CONFIG.vocab_size, (3, TEST_CONFIG.context),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        global_out = server.model(x)
        downs = {}
        for method in (FedPLoRA(), Method()):  # fold vs rescale, on the same index draws
            down = method.downlink(server, method.sketches(server, k, torch.Generator()
                                                           .manual_seed(k)))
            with compact_factors(server.model, down):
                downs[method.name] = (down, server.model(x))
    plora, fslora = downs["fed-plora"], downs["fslora"]
    torch.testing.assert_close(plora[1], global_out, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(plora[0][n].sketch.indices, fslora[0][n].sketch.indices)
               for n in plora[0])
    if k < r:
        assert rel(fslora[1], global_out) > 1e-3  # r / k_i rescaling starts elsewhere
        assert all(f.fold.sketch.k == r - k for f in plora[0].values())
    else:
        assert all(f.fold is None for f in plora[0].values())


def test_fed_plora_fold_is_the_dense_folded_weight_forward_and_backward():
    m, n, r, k = 7, 5, 4, 2  # non-square: a transposed fold cannot pass
    server = one_layer(m, n, r)
    layer, method = server.modules["l"], FedPLoRA()
    f = method.downlink(server, method.sketches(server, k, torch.Generator().manual_seed(1)))["l"]
    f.b.requires_grad_(True), f.a.requires_grad_(True)
    x = torch.randn(3, n, dtype=torch.float64)
    b_ref, a_ref = (t.detach().clone().requires_grad_(True) for t in (f.b, f.a))
    w_i = fold_weights(layer.weight, layer.scale, layer.lora_B.detach(),
                       layer.lora_A.detach(), f.sketch.indices)  # W0_i, dense
    ref = x @ (w_i + layer.scale * b_ref @ a_ref).T + layer.bias
    with compact_factors(server.model, {"l": f}):
        out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward(), ref.square().sum().backward()
    torch.testing.assert_close(f.b.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.a.grad, a_ref.grad, rtol=1e-12, atol=1e-12)
    assert f.fold.b.grad is None and f.fold.a.grad is None  # the fold stays frozen


@pytest.mark.parametrize("make", [FedPLoRA, HetLoRA, RescaledHetLoRA,
                                  lambda: FLASC(position_numbers=0)],
                         ids=["fed-plora", "hetlora", "hetlora-rescaled", "flasc, positions free"])
def test_with_every_budget_r_it_is_fedavg_lora_step_for_step(make):
    """Fed-PLoRA with every N_i = R folds nothing; HetLoRA's prefix (at alpha / r or alpha / k_i,
    the same at k_i = r) is every rank; FLASC with the whole budget for values sends everything.
    Each is then FedAvg-LoRA, bit for bit (so the two HetLoRAs are each other, too)."""
    r = 4
    new = tiny_federation([r, r, r], r, method=make())
    avg = tiny_federation([r, r, r], r, method=FedAvgLoRA(full=True))
    for t in range(1, 4):
        new.run_round(t), avg.run_round(t)
        assert same_model(new.server.model, avg.server.model), t


# ---------------------------------------------------------------- per-rank normalizers


def hand_average(updates: list[ClientUpdate], r: int, normalizer: str):
    """D_j written out rank by rank: sum_{i: j in I_i} w_i d_ij / c_j (server.index_normalizer)."""
    m, n = updates[0].deltas["l"][0].shape[0], updates[0].deltas["l"][1].shape[1]
    D_b, D_a = torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, n, dtype=torch.float64)
    for j in range(r):
        holders = [(u, u.sketches["l"].indices.tolist().index(j)) for u in updates
                   if j in u.sketches["l"].indices.tolist()]
        if not holders:
            continue
        if normalizer == "participants":
            w, c = [1.0] * len(holders), len(updates)
        elif normalizer == "coverage":
            w, c = [1.0] * len(holders), len(holders)
        else:  # "data": the data of the clients holding j
            w = [float(u.num_examples) for u, _ in holders]
            c = sum(w)
        for wi, (u, pos) in zip(w, holders):
            D_b[:, j] += wi * u.deltas["l"][0][:, pos] / c
            D_a[j] += wi * u.deltas["l"][1][pos] / c
    return D_b, D_a


@pytest.mark.parametrize("normalizer", AGGREGATIONS)
def test_each_normalizer_equals_a_hand_computation_on_unequal_client_sizes(normalizer):
    m, n, r = 3, 2, 5
    g = torch.Generator().manual_seed(5)
    plan = [([0, 2], 10), ([3, 2, 4], 30), ([2], 5)]  # (I_i, n_i): rank 1 nobody draws
    updates = [ClientUpdate(i, {"l": Sketch(torch.tensor(index), r)},
                            {"l": (torch.randn(m, len(index), generator=g, dtype=torch.float64),
                                   torch.randn(len(index), n, generator=g, dtype=torch.float64))},
                            size, 0)
               for i, (index, size) in enumerate(plan)]
    D_b, D_a = average_padded_deltas(updates, r, normalizer)["l"]
    H_b, H_a = hand_average(updates, r, normalizer)
    torch.testing.assert_close(D_b, H_b, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(D_a, H_a, rtol=1e-14, atol=1e-14)
    assert not D_b[:, 1].any() and not D_a[1].any()
    server = one_layer(m, n, r, aggregation=normalizer)  # the server switch applies the same
    B0 = server.modules["l"].lora_B.detach().clone()
    server.apply_updates(updates)
    torch.testing.assert_close(server.modules["l"].lora_B.detach() - B0, H_b, rtol=1e-13,
                               atol=1e-13)


def test_normalizers_differ_where_the_sizes_differ():
    r, g = 3, torch.Generator().manual_seed(6)
    updates = [ClientUpdate(i, {"l": Sketch(torch.tensor([0, 1]), r)},
                            {"l": (torch.randn(2, 2, generator=g, dtype=torch.float64),
                                   torch.randn(2, 2, generator=g, dtype=torch.float64))},
                            size, 0) for i, size in enumerate([1, 9])]
    cov, data = (average_padded_deltas(updates, r, x)["l"][0] for x in ("coverage", "data"))
    assert rel(cov, data) > 1e-3
    with pytest.raises(ValueError, match="aggregation must be one of"):
        average_padded_deltas(updates, r, "median")


# ---------------------------------------------------------------- FFA-LoRA, RoLoRA, FedEx-LoRA


def random_round(server: Server, method: Method, ks: list[int], sizes: list[int]):
    """Downlinks from `method`; random float64 deltas of the factors each client trains."""
    g = torch.Generator().manual_seed(sum(ks) + len(ks))
    downs, ups = [], []
    for i, (k, size) in enumerate(zip(ks, sizes)):
        down = method.downlink(server, method.sketches(server, k, g))
        f = down["l"]
        db = torch.randn(f.b.shape, generator=g, dtype=torch.float64) * f.train_b
        da = torch.randn(f.a.shape, generator=g, dtype=torch.float64) * f.train_a
        downs.append(down)
        ups.append(ClientUpdate(i, {"l": f.sketch}, {"l": (db, da)}, size, 0))
    return downs, ups


def mean_product(server: Server, downs, ups, weights: list[float]) -> torch.Tensor:
    """sum_i p_i s (b_0 + db_i)(a_0 + da_i): the average of the clients' LoRA updates."""
    s = server.modules["l"].scale
    return sum(p * s * (d["l"].b + u.deltas["l"][0]) @ (d["l"].a + u.deltas["l"][1])
               for d, u, p in zip(downs, ups, weights))


@pytest.mark.parametrize("make", [FFALoRA, RoLoRA, lambda: FedAvgLoRA(full=False)])
def test_one_shared_factor_makes_the_average_of_products_the_product_of_averages(make):
    server, method = one_layer(7, 5, 3), make()
    for phase in range(2):  # RoLoRA: a B round, then an A round
        downs, ups = random_round(server, method, [3, 3, 3], [10, 30, 20])
        expected = mean_product(server, downs, ups, [1 / 3] * 3)
        method.aggregate(server, ups, downs)
        err = rel(server.modules["l"].delta_weight().detach(), expected)
        if isinstance(method, (FFALoRA, RoLoRA)):
            assert err < 1e-13, (method.name, phase)
        else:  # both factors averaged separately: not exact (the control)
            assert err > 1e-3


def test_ffa_lora_never_moves_a_and_rolora_alternates_b_then_a():
    ffa, ro = (tiny_federation([2, 2, 2], 2, method=m) for m in (FFALoRA(), RoLoRA()))
    A0 = {n: A.detach().clone() for n, (_, A) in global_factors(ffa.server.model).items()}
    for t in (1, 2):
        ffa.run_round(t)
    assert all(torch.equal(A, A0[n]) for n, (_, A) in global_factors(ffa.server.model).items())
    assert all(B.any() for B, _ in global_factors(ffa.server.model).values())
    for t, moved in ((1, "B"), (2, "A"), (3, "B")):
        before = {n: (B.detach().clone(), A.detach().clone())
                  for n, (B, A) in global_factors(ro.server.model).items()}
        ro.run_round(t)
        for n, (B, A) in global_factors(ro.server.model).items():
            assert torch.equal(A, before[n][1]) == (moved == "B"), (t, n)
            assert torch.equal(B, before[n][0]) == (moved == "A"), (t, n)


@pytest.mark.parametrize("server_lr, normalizer", [(1.0, "participants"), (1.0, "data"),
                                                   (0.5, "participants")])
def test_fedex_lora_folds_the_exact_residual_into_w0_on_non_square_modules(server_lr, normalizer):
    m, n, R = 7, 5, 3  # non-square: the residual must be (m, n), not its transpose
    sizes = [10, 30, 20]
    server = one_layer(m, n, R, server_lr=server_lr, aggregation=normalizer)
    twin = one_layer(m, n, R, server_lr=server_lr, aggregation=normalizer)  # FedAvg-LoRA
    layer = server.modules["l"]
    before = layer.weight.detach() + layer.delta_weight().detach()  # W0 + s B_0 A_0
    method = FedExLoRA()
    downs, ups = random_round(server, method, [R] * 3, sizes)
    p = ([s / sum(sizes) for s in sizes] if normalizer == "data" else [1 / 3] * 3)
    target = (1 - server_lr) * before + server_lr * (layer.weight.detach()
                                                     + mean_product(server, downs, ups, p))
    method.aggregate(server, ups, downs)
    FedAvgLoRA(full=False).aggregate(twin, ups, downs)
    torch.testing.assert_close(layer.weight + layer.delta_weight(), target, rtol=1e-12,
                               atol=1e-12)  # the global model is exactly the clients' average
    for t in ("lora_B", "lora_A"):  # the factors are FedAvg-LoRA's; only W0 differs
        assert torch.equal(getattr(layer, t), getattr(twin.modules["l"], t))
    assert rel(layer.weight, twin.modules["l"].weight) > 1e-3  # a residual was folded
    assert method.numbers_down(downs[0]) == R * (m + n) + min(m * n, 4 * R * (m + n))


# ---------------------------------------------------------------- FLASC


def test_top_k_keeps_exactly_the_largest_entries_of_b_and_a_together():
    b = torch.tensor([[0.1, -5.0], [2.0, 0.0]], dtype=torch.float64)
    a = torch.tensor([[-3.0, 0.2, 0.3], [4.0, -0.05, 1.0]], dtype=torch.float64)
    kb, ka = top_k_entries(b, a, 3)
    assert kb.tolist() == [[0.0, -5.0], [0.0, 0.0]]
    assert ka.tolist() == [[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    assert top_k_entries(b, a, 10)[0] is b  # a budget of every entry sends everything


def test_flasc_moves_the_bytes_of_fslora_at_the_same_budgets_and_trains_dense():
    ranks = [1, 2, 4]
    records = {}
    for method in ("fslora", "flasc"):
        fed = federation(ranks, "batched", "sgd", method, "cpu", torch.float64)
        records[method] = (fed, fed.run_round(1))
    (fs, fs_rec), (fl, fl_rec) = records["fslora"], records["flasc"]
    assert fl_rec.bytes_up == fs_rec.bytes_up and fl_rec.bytes_down == fs_rec.bytes_down
    shapes = fl.server.shapes.values()
    assert fl_rec.numbers_up == [k * sum(m + n for m, n in shapes) for k in ranks]
    plan = fl.plan_round()  # the next round's downloads: top-d of the dense global factors
    for k, down in zip(ranks, plan.downlinks):
        for f in down.values():
            m, n = f.b.shape[0], f.a.shape[1]
            assert f.sketch.k == 4 and f.sketch.entries == k * (m + n) // 2
            assert int(f.b.count_nonzero() + f.a.count_nonzero()) <= f.sketch.entries
    assert FLASC().trainable_numbers(1, 4, 16, 64) == 4 * 80  # dense local LoRA: rank R memory


# ---------------------------------------------------------------- the one loop and its accounting


@pytest.mark.parametrize("method", NEW_METHODS)
def test_batched_engine_gives_the_sequential_model(method):
    """Folds, frozen factors, sparse messages and W0 residuals in both engines."""
    models = {}
    for engine in ("sequential", "batched"):
        fed = federation([1, 2, 4], engine, "adamw", method, "cpu", torch.float64)
        for t in (1, 2):
            fed.run_round(t)
        models[engine] = fed.server.model
    for p_seq, p_bat in zip(models["sequential"].parameters(), models["batched"].parameters()):
        assert rel(p_bat, p_seq) < 1e-10


def test_every_new_method_counts_what_it_moves_trains_and_covers():
    """Per client-round numbers down and up, and each client's trainable numbers (memory).

    `federation` gives the clients k_i = 1, 2, 4 of R = 4 as they are (the rank-R methods then
    train all R ranks, as they would at R = min k_i in a run built by build_federation)."""
    ranks = [1, 2, 4]
    for method in NEW_METHODS:
        fed = federation(ranks, "batched", "sgd", method, "cpu", torch.float64)
        shapes, R = list(fed.server.shapes.values()), fed.server.rank
        per_rank = sum(m + n for m, n in shapes)
        col_b, col_a = sum(m for m, _ in shapes), sum(n for _, n in shapes)
        recs = [fed.run_round(t) for t in (1, 2)]
        down, up = [r.numbers_down for r in recs], [r.numbers_up for r in recs]
        trained = ranks if method in ("fed-plora", "flasc") else [R] * 3
        if method == "fed-plora":  # the whole global LoRA down, the trained ranks up
            assert down == [[R * per_rank] * 3] * 2 and up == [[k * per_rank for k in ranks]] * 2
            for name, cov in fed.server.coverage.items():
                assert int(cov.sum()) == 2 * sum(ranks), name
        elif method == "ffa-lora":  # B only, both ways
            assert down == up == [[R * col_b] * 3] * 2
        elif method == "rolora":  # both factors down; B up, then A up
            assert down == [[R * per_rank] * 3] * 2
            assert up == [[R * col_b] * 3, [R * col_a] * 3]
        elif method == "fedex-lora":  # round 1's residual comes down in round 2
            residual = sum(min(m * n, 4 * R * (m + n)) for m, n in shapes)  # M + 1 = 4
            assert down == [[R * per_rank] * 3, [R * per_rank + residual] * 3]
            assert up == [[R * per_rank] * 3] * 2
        else:  # flasc: FSLoRA's numbers at each budget k_i, both ways
            assert down == up == [[k * per_rank for k in ranks]] * 2
        memory = {"fed-plora": [k * per_rank for k in ranks], "flasc": [R * per_rank] * 3,
                  "ffa-lora": [R * col_b] * 3,
                  "rolora": [R * sum(max(m, n) for m, n in shapes)] * 3,
                  "fedex-lora": [R * per_rank] * 3}[method]
        assert [sum(fed.method.trainable_numbers(k, R, m, n) for m, n in shapes)
                for k in trained] == memory, method


def test_cli_offers_every_method_by_name(capsys):
    parser = build_parser()
    for method in METHODS:
        args = parser.parse_args(["run", "--method", method])
        assert config_from_args(args).method == method
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--method", "fed-lora"])
    err = capsys.readouterr().err  # argparse lists the choices: METHODS
    assert all(f"'{m}'" in err for m in NEW_METHODS)


@pytest.mark.parametrize("method", ["rolora", "fedex-lora"])  # the new methods with state
def test_interrupted_and_resumed_run_equals_uninterrupted_run(method, tmp_path, monkeypatch):
    """Cut after round 1 (RoLoRA's next factor is A; FedEx-LoRA owes round 1's residual)."""
    def config(out: str):
        cfg = tiny_experiment(out, rounds=3, participants=3)
        return dataclasses.replace(cfg, method=method, checkpoint_every=1)

    full, _ = run_experiment(config(str(tmp_path / "full")), progress=False)
    run_cut_in_round(config(str(tmp_path / "cut")), 2, monkeypatch)
    resumed, _ = run_experiment(config(str(tmp_path / "cut")), progress=False, resume=True)
    assert without_timing(resumed.to_dict()) == without_timing(full.to_dict())
    assert_same_model(final_state(tmp_path / "cut"), final_state(tmp_path / "full"))
