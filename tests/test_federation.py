"""Client, server and federation: FedAvg equivalence, hand-computed aggregation, untouched ranks,
communication counts, seeding, and that a short federation learns."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from fslora_min.client import ClientConfig, ClientUpdate, train_client
from fslora_min.data import minibatches, split_inputs_targets
from fslora_min.experiment import run_experiment
from fslora_min.lora import LoRALinear, lora_modules
from fslora_min.model import lm_loss
from fslora_min.rng import MINIBATCHES, generator
from fslora_min.server import Server, ServerConfig, average_padded_deltas
from fslora_min.sketch import Sketch
from tests.tiny import tiny_experiment, tiny_federation


def plain_fedavg_round(model: nn.Module, data, streams, cfg: ClientConfig) -> None:
    """FedAvg on LoRA written out: every client trains all of B, A; the server averages."""
    layers = [m for _, m in lora_modules(model)]
    start = [(m.lora_B.detach().clone(), m.lora_A.detach().clone()) for m in layers]
    total = [(torch.zeros_like(b), torch.zeros_like(a)) for b, a in start]
    for i in range(len(data.clients)):
        with torch.no_grad():
            for m, (b, a) in zip(layers, start):
                m.lora_B.copy_(b), m.lora_A.copy_(a)
        opt = torch.optim.SGD([p for m in layers for p in (m.lora_B, m.lora_A)], lr=cfg.lr)
        for _ in range(cfg.local_steps):
            loss = lm_loss(model, *split_inputs_targets(next(streams[i])))
            opt.zero_grad()
            loss.backward()
            opt.step()
        for (tb, ta), m, (b, a) in zip(total, layers, start):
            tb += m.lora_B.detach() - b
            ta += m.lora_A.detach() - a
    with torch.no_grad():
        for m, (b, a), (tb, ta) in zip(layers, start, total):
            m.lora_B.copy_(b + tb / len(data.clients)), m.lora_A.copy_(a + ta / len(data.clients))


def test_fslora_with_full_rank_is_fedavg_on_lora_round_for_round():
    r = 4
    fedn = tiny_federation([r, r, r], r)
    plain = copy.deepcopy(fedn.server.model)
    streams = [minibatches(c.train, 4, generator(0, MINIBATCHES, i))
               for i, c in enumerate(fedn.data.clients)]
    for t in range(1, 4):
        fedn.run_round(t)
        plain_fedavg_round(plain, fedn.data, streams, fedn.client_cfg)
        for (_, a), (_, b) in zip(lora_modules(fedn.server.model), lora_modules(plain)):
            torch.testing.assert_close(a.lora_B, b.lora_B, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.lora_A, b.lora_A, rtol=1e-5, atol=1e-6)


def one_layer_server(m: int, n: int, r: int, aggregation: str = "participants") -> Server:
    model = nn.ModuleDict({"l": LoRALinear(nn.Linear(n, m).double(), r, alpha=float(r))})
    with torch.no_grad():
        model["l"].lora_B.copy_(torch.randn(m, r, dtype=torch.float64))
    return Server(model, ServerConfig(aggregation=aggregation))


@pytest.mark.parametrize("aggregation", ["participants", "coverage"])
def test_aggregation_equals_hand_computation_and_undrawn_index_stays(aggregation):
    m, n, r = 2, 3, 4
    server = one_layer_server(m, n, r, aggregation)
    layer = server.modules["l"]
    B0, A0 = layer.lora_B.detach().clone(), layer.lora_A.detach().clone()
    d1 = (torch.randn(m, 2, dtype=torch.float64), torch.randn(2, n, dtype=torch.float64))
    d2 = (torch.randn(m, 2, dtype=torch.float64), torch.randn(2, n, dtype=torch.float64))
    u1 = ClientUpdate(0, {"l": Sketch(torch.tensor([0, 2]), r)}, {"l": d1}, 10, 0)
    u2 = ClientUpdate(1, {"l": Sketch(torch.tensor([3, 2]), r)}, {"l": d2}, 10, 0)
    server.apply_updates([u1, u2])
    once = 2 if aggregation == "participants" else 1  # divisor of an index drawn by one client
    B_hand, A_hand = B0.clone(), A0.clone()
    B_hand[:, 0] += d1[0][:, 0] / once
    B_hand[:, 2] += (d1[0][:, 1] + d2[0][:, 1]) / 2
    B_hand[:, 3] += d2[0][:, 0] / once
    A_hand[0] += d1[1][0] / once
    A_hand[2] += (d1[1][1] + d2[1][1]) / 2
    A_hand[3] += d2[1][0] / once
    torch.testing.assert_close(layer.lora_B.detach(), B_hand, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer.lora_A.detach(), A_hand, rtol=1e-14, atol=1e-14)
    assert torch.equal(layer.lora_B[:, 1], B0[:, 1]) and torch.equal(layer.lora_A[1], A0[1])
    assert server.coverage["l"].tolist() == [1, 0, 2, 1]


def test_average_of_no_updates_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        average_padded_deltas([], 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_local_step_moves_only_the_sketched_ranks(optimizer):
    r, k = 6, 2
    fedn = tiny_federation([k], r, local_steps=1, optimizer=optimizer)
    server = fedn.server
    before = {n: (m.lora_B.detach().clone(), m.lora_A.detach().clone())
              for n, m in server.modules.items()}
    sketches = {n: Sketch(torch.randperm(r)[:k], r) for n in server.module_names}
    update = train_client(server.model, 0, server.downlink(sketches), fedn.batch_streams[0],
                          fedn.client_cfg, 12)
    assert all(p.grad is None for p in server.model.parameters())  # the client trained copies
    server.apply_updates([update])
    for name, m in server.modules.items():
        index = update.sketches[name].indices  # the ONE index set of this module
        B0, A0 = before[name]
        moved_cols = (m.lora_B.detach() != B0).any(0).nonzero().flatten()
        moved_rows = (m.lora_A.detach() != A0).any(1).nonzero().flatten()
        # B and A moved at exactly the ranks of the module's one index set, nowhere else
        assert moved_cols.tolist() == moved_rows.tolist() == index.sort().values.tolist()


def test_communication_and_trainable_counts_are_k_times_m_plus_n():
    r, ranks = 8, [1, 3, 8]
    fedn = tiny_federation(ranks, r)
    record = fedn.run_round(1)
    per_rank = sum(m + n for m, n in fedn.server.shapes.values())  # sum over modules of m + n
    expected = [ranks[i] * per_rank for i in record.participants]
    assert record.numbers_down == record.numbers_up == expected
    assert record.bytes_up == [4 * e for e in expected]  # float32 factors
    sketches = {n: Sketch(torch.arange(3), r) for n in fedn.server.module_names}
    update = train_client(fedn.server.model, 1, fedn.server.downlink(sketches),
                          fedn.batch_streams[1], fedn.client_cfg, 12)
    assert update.trainable_parameters == 3 * per_rank


def test_client_budget_above_global_rank_is_rejected():
    with pytest.raises(ValueError, match="k=5"):
        tiny_federation([2, 5], 4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FSLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_same_seed_same_metrics_other_seed_differs_and_loss_drops(cache):
    def losses(seed):
        history, _ = run_experiment(tiny_experiment(str(cache), seed=seed, rounds=6),
                                    progress=False)
        return history.initial_loss, [r.heldout_loss for r in history.rounds]

    first, again, other = losses(0), losses(0), losses(1)
    assert first == again
    assert first[1] != other[1]
    initial, curve = first
    assert curve[-1] < initial - 0.01  # a short federation lowers the global held-out loss


def test_a_run_on_the_triton_kernels_matches_the_pytorch_run(cache, triton_calls):
    """The config's lora_backend and lora_gemm reach every layer: a sequential-engine round on
    the Triton kernels (in the interpreter on a CPU) gives the PyTorch round's held-out loss.

    One round of two local steps, so that both factors move (B from the first step, A from the
    second, once B is non-zero) but fp32 rounding is not carried through many steps at lr 0.3,
    which amplifies it chaotically (two rounds of four steps: 3e-4 to 6e-4 apart). Over one or
    two steps the two backends were 0 to 8e-8 apart (fp32's unit roundoff is 6e-8): a relative
    1e-6 leaves a tenfold margin and is under a thousandth of how far the round moves the loss
    (5e-3 relative; checked below), so a wrong LoRA term fails it."""
    losses = {}
    for backend in ("torch", "triton"):
        cfg = tiny_experiment(str(cache / backend), rounds=1, num_clients=2, participants=2,
                              engine="sequential", lora_backend=backend,
                              lora_gemm="merged" if backend == "triton" else "pointer")
        cfg = dataclasses.replace(
            cfg, client=dataclasses.replace(cfg.client, local_steps=2),
            compute=dataclasses.replace(cfg.compute,
                                        device="cuda" if torch.cuda.is_available() else "cpu"))
        history, _ = run_experiment(cfg, progress=False)
        losses[backend] = [history.initial_loss] + [r.heldout_loss for r in history.rounds]
    assert triton_calls and set(triton_calls) == {"merged"}  # what the config named, in every kernel call
    before, after = losses["torch"]
    assert abs(after - before) > 1e3 * 1e-6 * before  # the round moved the loss far beyond 1e-6
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-6)
