"""The batched engine (fslora_min/engine.py) against the sequential loop, and its layer against
its one-client-at-a-time reference (kernels/batched_lora.py), forward and every gradient.

Tolerances are on the relative Frobenius error ||out - ref|| / ||ref||:
- float64 (CPU): 1e-10. Same math, different summation order.
- float32 (a GPU, where the sequential engine runs the Triton kernels and the batched one cuBLAS;
  neither uses TF32): 1e-4 after a few rounds of training, whose steps pass on rounding.
"""

from __future__ import annotations

import pytest
import torch

from fslora_min.data import make_federated_data
from fslora_min.engine import resolve_engine, stack_downlinks, train_clients_batched
from fslora_min.cli import build_parser, config_from_args
from fslora_min.client import ClientConfig
from fslora_min.federation import Federation, FederationConfig
from fslora_min.lora import apply_lora, global_factors, lora_modules
from fslora_min.methods import make_method
from fslora_min.model import TEST_CONFIG, Transformer
from fslora_min.server import Server, ServerConfig
from kernels.batched_lora import batched_lora_linear, batched_lora_linear_reference
from tests.tiny import TINY_DATA

DEVICES = [("cpu", torch.float64)] + ([("cuda", torch.float32)] if torch.cuda.is_available()
                                      else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("P, T, n, m, K", [(1, 5, 7, 3, 1), (3, 11, 16, 9, 4), (4, 2, 5, 13, 6)])
def test_batched_linear_matches_reference_forward_and_backward(P, T, n, m, K):
    g = torch.Generator().manual_seed(P * 100 + K)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(P, T, n, generator=g, **f64).requires_grad_(True)
    w, bias = torch.randn(m, n, generator=g, **f64), torch.randn(m, generator=g, **f64)
    b = torch.randn(P, m, K, generator=g, **f64).requires_grad_(True)
    a = torch.randn(P, K, n, generator=g, **f64).requires_grad_(True)
    coef = torch.rand(P, K, generator=g, **f64) + 0.5
    coef[0, K // 2:] = 0  # client 0 is padded beyond rank K // 2
    dy = torch.randn(P, T, m, generator=g, **f64)
    grads = []
    for fn in (batched_lora_linear, batched_lora_linear_reference):
        y = fn(x, w, bias, b, a, coef)
        grads.append((y, *torch.autograd.grad(y, (x, b, a), dy)))
    for out, ref in zip(*grads):
        assert rel(out, ref) < 1e-12
    _, _, db, da = grads[0]
    assert not db[0, :, K // 2:].any() and not da[0, K // 2:].any()  # padding: zero gradient


def test_batched_linear_rejects_mismatched_shapes():
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="one K"):
        batched_lora_linear(x, w, None, torch.randn(2, 5, 3), torch.randn(2, 2, 4),
                            torch.ones(2, 3))


def federation(ranks: list[int], engine: str, optimizer: str, method: str, device: str,
               dtype: torch.dtype, r: int = 4, last_rows: int | None = None) -> Federation:
    """A tiny full-participation federation, built identically for either engine.

    `last_rows` cuts the last client's training set to that many sequences.
    """
    torch.manual_seed(0)
    model = Transformer(TEST_CONFIG)
    apply_lora(model, r, alpha=2.0 * r, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-zero B so that A also gets a gradient from the first step
        for _, layer in lora_modules(model):
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.to(device, dtype)
    fed = FederationConfig(num_clients=len(ranks), participants=len(ranks), rounds=2, rank=r,
                           lora_alpha=2.0 * r, engine=engine)
    client = ClientConfig(local_steps=3, lr=0.3 if optimizer == "sgd" else 0.01,
                          optimizer=optimizer, weight_decay=0.1 if optimizer == "adamw" else 0.0,
                          batch_size=4)
    data = make_federated_data(TINY_DATA, len(ranks))
    if last_rows is not None:
        data.clients[-1].train = data.clients[-1].train[:last_rows]
    return Federation(Server(model, ServerConfig()), data, ranks, fed, client,
                      make_method(method, 2.0 * r, r, False, torch.Generator().manual_seed(2)))


CASES = [("sgd", [2, 2, 2], "fslora"), ("sgd", [1, 2, 4], "fslora"),
         ("adamw", [3, 3, 3], "fslora"), ("adamw", [1, 3, 4, 2], "fslora"),
         ("sgd", [1, 2, 4], "fslora-importance"),  # one diagonal value per index
         ("adamw", [1, 2, 3], "flora")]  # fresh factors each round, a fixed diagonal value


@pytest.mark.parametrize("device, dtype", DEVICES)
@pytest.mark.parametrize("optimizer, ranks, method", CASES)
def test_batched_engine_gives_the_sequential_global_factors(optimizer, ranks, method, device,
                                                            dtype):
    results = {}
    for engine in ("sequential", "batched"):
        fed = federation(ranks, engine, optimizer, method, device, dtype)
        assert fed.engine == engine
        for t in (1, 2):
            fed.run_round(t)
        results[engine] = fed.server.model
    seq, bat = (global_factors(results[e]) for e in ("sequential", "batched"))
    for name, (B, A) in seq.items():
        assert rel(bat[name][0], B) < TOL[dtype], name
        assert rel(bat[name][1], A) < TOL[dtype], name
    for p_seq, p_bat in zip(results["sequential"].parameters(), results["batched"].parameters()):
        assert rel(p_bat, p_seq) < TOL[dtype]  # FLoRA also merges into W0


def test_padding_is_zero_with_zero_coefficient_and_updates_have_each_clients_shape():
    fed = federation([1, 4], "batched", "adamw", "fslora", "cpu", torch.float64)
    server = fed.server
    downlinks = [server.downlink(fed.method.sketches(server, k, fed.sketch_stream))
                 for k in (1, 4)]
    factors = stack_downlinks(downlinks, {n: 1.0 for n in server.module_names},
                              torch.device("cpu"))
    for f in factors.values():  # zero, and multiplied by 0: no gradient (see the first test)
        assert f.b.shape[2] == 4 and not f.coef[0, 1:].any() and (f.coef[1] > 0).all()
        assert not f.b[0, :, 1:].any() and not f.a[0, 1:].any()
    updates = train_clients_batched(server.model, [0, 1], downlinks,
                                    [fed.batch_streams[i] for i in (0, 1)], fed.client_cfg,
                                    [12, 12])
    for u, k in zip(updates, (1, 4)):
        for name, (db, da) in u.deltas.items():
            m, n = server.shapes[name]
            assert db.shape == (m, k) and da.shape == (k, n) and db.abs().sum() > 0
        assert u.trainable_parameters == sum(k * (m + n) for m, n in server.shapes.values())


def test_engine_choice_is_validated_and_auto_resolves_per_device():
    with pytest.raises(ValueError, match="engine"):
        FederationConfig(engine="parallel")
    for device in ("cpu", "cuda"):
        assert resolve_engine("auto", torch.device(device)) in ("sequential", "batched")
    assert resolve_engine("sequential", torch.device("cpu")) == "sequential"


def test_batched_engine_rejects_unequal_minibatches():
    fed = federation([2, 2], "batched", "sgd", "fslora", "cpu", torch.float64, last_rows=3)
    with pytest.raises(ValueError, match="equal minibatch shapes"):
        fed.run_round(1)


def test_cli_engine_flag_reaches_the_federation_config():
    for engine in ("sequential", "batched", "auto"):
        args = build_parser().parse_args(["run", "--engine", engine])
        assert config_from_args(args).federation.engine == engine
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--engine", "parallel"])
