"""The batched engine (fslora_min/engine.py) against the sequential loop, and its layer against
its one-client-at-a-time reference (kernels/batched_lora.py), forward and every gradient.

Tolerances are on the relative Frobenius error ||out - ref|| / ||ref||:
- float64 (CPU): 1e-10. Same math, different summation order.
- float32 (a GPU, where the sequential engine runs the Triton kernels and the batched one cuBLAS;
  neither uses TF32): 1e-4 after a few rounds of training, whose steps pass on rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from fslora_min.study.bench_engine import BenchConfig, run_benchmark
from fslora_min.data import make_federated_data, minibatches
from fslora_min.engine import (CPU_PASS_BYTES, default_clients_per_pass, resolve_engine,
                               stack_downlinks, train_clients_batched)
from fslora_min.cli import build_parser, config_from_args
from fslora_min.client import ClientConfig
from fslora_min.compute import ComputeConfig
from fslora_min.federation import Federation, FederationConfig
from fslora_min.lora import apply_lora, global_factors
from fslora_min.registry import make_method
from fslora_min.model import ModelConfig, Transformer
from fslora_min.server import Server, ServerConfig
from kernels.batched_lora import batched_lora_linear, batched_lora_linear_reference
from tests.tiny import TINY_DATA, tiny_lora_model

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
               dtype: torch.dtype, r: int = 4, last_rows: int | None = None,
               clients_per_pass: int = 0, dropout: float = 0.0, lr_scaling: str = "none",
               lr: float | None = None, scored_from: int = 0) -> Federation:
    """A tiny full-participation federation, built identically for either engine.

    `last_rows` cuts the last client's training set to that many sequences; `dropout` is the
    model's; `lr` (default: the optimizer's own) and `lr_scaling` the clients'. The model
    starts in eval mode, as a pretrained base does (fslora_min/pretrain.py). `scored_from` is the
    data's first scored target (the planted task's is its prefix's end).
    """
    model = tiny_lora_model(r, dropout).to(device, dtype).eval()
    fed = FederationConfig(num_clients=len(ranks), participants=len(ranks), rounds=2)
    compute = ComputeConfig(engine=engine, clients_per_pass=clients_per_pass)
    lr = (0.3 if optimizer == "sgd" else 0.01) if lr is None else lr
    client = ClientConfig(local_steps=3, lr=lr, lr_scaling=lr_scaling, optimizer=optimizer,
                          weight_decay=0.1 if optimizer == "adamw" else 0.0, batch_size=4)
    data = make_federated_data(TINY_DATA, len(ranks))
    if last_rows is not None:
        data.clients[-1].train = data.clients[-1].train[:last_rows]
    data.scored_from = scored_from
    return Federation(Server(model, ServerConfig()), data, ranks, fed, client,
                      make_method(method, r, torch.Generator().manual_seed(2)), compute)


CASES = [("sgd", [2, 2, 2], "fslora"), ("sgd", [1, 2, 4], "fslora"),
         ("adamw", [3, 3, 3], "fslora"), ("adamw", [1, 3, 4, 2], "fslora"),
         ("sgd", [1, 2, 4], "fslora-importance"),  # one diagonal value per index
         ("adamw", [1, 2, 3], "flora")]  # fresh factors each round, a fixed diagonal value


@pytest.mark.parametrize("device, dtype", DEVICES)
@pytest.mark.parametrize("optimizer, ranks, method", CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])  # the model's: each client's masks its own
def test_batched_engine_gives_the_sequential_global_factors(optimizer, ranks, method, device,
                                                            dtype, dropout):
    results = {}  # batched in one pass of all clients, and in passes of 2 (the last may hold 1)
    for run, engine, per_pass in (("sequential", "sequential", 0),
                                  ("batched", "batched", len(ranks)),
                                  ("batched in passes of 2", "batched", 2)):
        fed = federation(ranks, engine, optimizer, method, device, dtype,
                         clients_per_pass=per_pass, dropout=dropout)
        assert fed.engine == engine
        for t in (1, 2):
            fed.run_round(t)
        results[run] = fed.server.model
    seq = global_factors(results["sequential"])
    for run in ("batched", "batched in passes of 2"):
        bat = global_factors(results[run])
        for name, (B, A) in seq.items():
            assert rel(bat[name][0], B) < TOL[dtype], (run, name)
            assert rel(bat[name][1], A) < TOL[dtype], (run, name)
        for p_seq, p_bat in zip(results["sequential"].parameters(), results[run].parameters()):
            assert rel(p_bat, p_seq) < TOL[dtype], run  # FLoRA also merges into W0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_both_engines_train_and_score_only_the_targets_from_scored_from(optimizer):
    """The planted task's loss (targets >= scored_from) in both engines, float64: the same
    global model, and a different one from scoring every target (so the knob is used)."""
    models, losses = {}, {}
    for engine, scored in (("sequential", 3), ("batched", 3), ("batched", 0)):
        fed = federation([1, 3, 4], engine, optimizer, "fslora", "cpu", torch.float64,
                         scored_from=scored)
        history = fed.run(progress=False)
        models[engine, scored], losses[engine, scored] = fed.server.model, history.initial_loss
    for p_seq, p_bat in zip(models["sequential", 3].parameters(),
                            models["batched", 3].parameters()):
        assert rel(p_bat, p_seq) < 1e-10
    assert any(rel(a, b) > 1e-6 for a, b in zip(models["batched", 3].parameters(),
                                                models["batched", 0].parameters()))
    assert losses["sequential", 3] == losses["batched", 3] != losses["batched", 0]


def trained_model(ranks: list[int], engine: str, optimizer: str, rounds: int = 2,
                  **knobs) -> torch.nn.Module:
    """The server's model after `rounds` rounds of a float64 fslora `federation` on a CPU."""
    fed = federation(ranks, engine, optimizer, "fslora", "cpu", torch.float64, **knobs)
    for t in range(1, rounds + 1):
        fed.run_round(t)
    return fed.server.model


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_per_client_lr_k_over_r_batched_gives_the_sequential_model(optimizer):
    """lr_scaling="ratio" on k_i = 1, 2, 4 of r = 4 (client lrs eta/4, eta/2, eta), in one
    batched pass and in passes of 2, against the one-client reference; it acts."""
    seq = trained_model([1, 2, 4], "sequential", optimizer, lr_scaling="ratio")
    for per_pass in (3, 2):
        bat = trained_model([1, 2, 4], "batched", optimizer, lr_scaling="ratio",
                            clients_per_pass=per_pass)
        for p_seq, p_bat in zip(seq.parameters(), bat.parameters()):
            assert rel(p_bat, p_seq) < 1e-10, per_pass
    plain = global_factors(trained_model([1, 2, 4], "sequential", optimizer))
    for name, (B, A) in global_factors(seq).items():
        assert rel(B, plain[name][0]) > 1e-3, name


@pytest.mark.parametrize("engine", ["sequential", "batched"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_ratio_is_eta_k_over_r_exactly(engine, optimizer):
    """Every k_i = r: "ratio" is "none", bit for bit. Every k_i = 2 of 4: "ratio" is "none" at
    eta / 2 (bit for bit in the reference; to rounding in the batched engine's rescaled step)."""
    base = 0.3 if optimizer == "sgd" else 0.01
    pairs = (([4, 4], dict(lr_scaling="ratio"), dict(), 0.0),
             ([2, 2], dict(lr_scaling="ratio", lr=base), dict(lr=base / 2),
              0.0 if engine == "sequential" else 1e-12))
    for ranks, scaled, plain, tol in pairs:
        a = trained_model(ranks, engine, optimizer, rounds=1, **scaled)
        b = trained_model(ranks, engine, optimizer, rounds=1, **plain)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q) if tol == 0 else rel(p, q) < tol, ranks


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_model_dropout_acts_in_local_training_with_masks_from_the_run_seed(engine):
    """Local steps run in train mode (dropout acts) though the model starts in eval mode, the
    masks come from the run's streams (not torch's global generator), and the model is back in
    eval mode for evaluation."""
    def trained(dropout: float, global_seed: int) -> dict:
        fed = federation([1, 2, 4], engine, "sgd", "fslora", "cpu", torch.float64,
                         dropout=dropout)
        torch.manual_seed(global_seed)  # masks drawn from the global generator would change
        fed.run_round(1)
        assert not fed.server.model.training
        return global_factors(fed.server.model)

    with_dropout, replayed = trained(0.3, 1), trained(0.3, 2)
    without = trained(0.0, 1)
    for name, (B, A) in with_dropout.items():
        assert torch.equal(B, replayed[name][0]) and torch.equal(A, replayed[name][1])
        assert rel(B, without[name][0]) > 1e-3 and rel(A, without[name][1]) > 1e-3, name


def test_padding_is_zero_with_zero_coefficient_and_updates_have_each_clients_shape():
    fed = federation([1, 4], "batched", "adamw", "fslora", "cpu", torch.float64)
    server = fed.server
    downlinks = [server.downlink(fed.method.sketches(server, k, fed.sketch_stream))
                 for k in (1, 4)]
    factors = stack_downlinks(downlinks, {n: 1.0 for n in server.module_names},
                              torch.device("cpu"))
    for f in factors.values():  # zero, and multiplied by 0: no gradient (see the first test)
        assert f.b.shape[2] == 4 and not f.client_scale[0, 1:].any()
        assert (f.client_scale[1] > 0).all()
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
        ComputeConfig(engine="parallel")
    for device in ("cpu", "cuda"):
        assert resolve_engine("auto", torch.device(device)) in ("sequential", "batched")
    assert resolve_engine("sequential", torch.device("cpu")) == "sequential"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"clients_per_pass.*{bad!r}"):
            ComputeConfig(clients_per_pass=bad)



def test_cpu_passes_keep_the_widest_activation_within_the_byte_budget():
    model = Transformer(ModelConfig())  # the default model: its widest layer is fc, 4 d = 512
    apply_lora(model, 4, alpha=8.0)  # the LoRA layers count (a LoRALinear is no nn.Linear)
    streams = [minibatches(torch.zeros(40, 65, dtype=torch.long), 16, torch.Generator())
               for _ in range(16)]
    per_client = 16 * 64 * 512 * 4  # rows x tokens x width x bytes: 2 MiB
    assert default_clients_per_pass(model, streams) == CPU_PASS_BYTES // per_client == 4
    model.double()  # 8-byte numbers
    assert default_clients_per_pass(model, streams) == 2
    three_rows = [minibatches(torch.zeros(3, 65, dtype=torch.long), 16, torch.Generator())]
    assert default_clients_per_pass(model, three_rows) == CPU_PASS_BYTES // (3 * 64 * 512 * 8)
    assert default_clients_per_pass(model.to("meta"), streams) == 16  # not a CPU: all at once


def test_batched_engine_rejects_unequal_minibatches():
    fed = federation([2, 2], "batched", "sgd", "fslora", "cpu", torch.float64, last_rows=3)
    with pytest.raises(ValueError, match="equal minibatch shapes"):
        fed.run_round(1)


def test_cli_engine_flag_reaches_the_federation_config():
    for engine in ("sequential", "batched", "auto"):
        args = build_parser().parse_args(["run", "--engine", engine])
        assert config_from_args(args).compute.engine == engine
    args = build_parser().parse_args(["run", "--clients-per-pass", "3"])
    assert config_from_args(args).compute.clients_per_pass == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--engine", "parallel"])


@pytest.mark.slow  # the benchmark itself, with a process per engine for its memory
def test_engine_benchmark_writes_both_engines_and_the_round_alone_memory(tmp_path):
    result = run_benchmark(BenchConfig(device="cpu", clients=(2,), repeats=1, rank=4,
                                       clients_per_pass=1, out_dir=str(tmp_path)))
    row, = result["rows"]
    seq, bat = row["sequential"], row["batched"]
    assert row["speedup"] == pytest.approx(bat["rounds_per_s"] / seq["rounds_per_s"])
    assert bat["clients_per_pass"] == 1
    for r in (seq, bat):  # the round's own peak comes from a fresh process, above its set-up
        assert r["rounds_per_s"] == pytest.approx(1 / r["median_s"])
        assert 0 < r["rss_before_round_mib"] <= r["peak_mib"]
        assert r["round_extra_mib"] == pytest.approx(r["peak_mib"] - r["rss_before_round_mib"])
    saved = json.loads(next(tmp_path.glob("bench_CPU_*.json")).read_text())
    assert saved["rows"][0]["speedup"] == row["speedup"]
