"""The server's half of a round on stacked tensors (issue 29): what it computes equals the
one-client-at-a-time reference, and the round stays within its operation budget."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from fslora_min.study.bench_engine import HOST_OPS_BUDGET, host_round
from fslora_min.engine import train_clients
from fslora_min.model import ModelConfig
from fslora_min.opcount import OpCounter
from fslora_min.validation import BadUpdate, check_update, screen_updates
from tests.corruptions import BAD, corrupt, with_index
from tests.tiny import tiny_federation


def test_counter_counts_every_non_view_operation_and_the_syncs():
    x = torch.randn(4, 3)
    with OpCounter() as c:
        y = x.view(-1)[2:].view(2, 5).t()  # views: nothing
        z = (y + 1).sum()  # two operations
        float(z)  # one read-back
        x.tolist(), x.numpy()  # host reads of a CPU tensor dispatch nothing
    assert (c.ops, c.syncs) == (3, 1) and c.by_name == {"add": 1, "sum": 1,
                                                        "_local_scalar_dense": 1}


def test_downlinks_of_a_round_are_each_clients_gather_and_copies():
    fedn = tiny_federation([1, 2, 4, 3], 4)
    server = fedn.server
    sketches = [fedn.method.sketches(server, k, fedn.sketch_stream) for k in fedn.client_ranks]
    downs = server.downlinks(sketches)
    for sk, down in zip(sketches, downs):
        assert list(down) == list(sk)
        for name, f in down.items():
            layer, index = server.modules[name], sk[name].indices
            assert f.sketch is sk[name]
            assert torch.equal(f.b, layer.lora_B[:, index]) and torch.equal(f.a, layer.lora_A[index])
    before = copy.deepcopy(downs)
    with torch.no_grad():
        for layer in server.modules.values():
            layer.lora_B.add_(1.0), layer.lora_A.add_(1.0)
    assert all(torch.equal(f.b, g.b) and torch.equal(f.a, g.a)
               for d, e in zip(downs, before) for f, g in zip(d.values(), e.values()))


def test_screening_a_round_gives_each_update_the_reason_one_check_gives_it():
    """Random rounds of 5 uploads, each honest or with up to three corruptions (a non-finite
    entry in one module and a wrong index set in a later one: the first is named)."""
    fedn = tiny_federation([2, 2, 2, 3, 4], 4)
    server, rng = fedn.server, random.Random(3)
    clients = list(range(5))
    downs = [server.downlink(fedn.method.sketches(server, fedn.client_ranks[i],
                                                  fedn.sketch_stream)) for i in clients]
    honest = train_clients("sequential", server.model, clients, downs,
                           [fedn.batch_streams[i] for i in clients], fedn.client_cfg, [12] * 5)
    for _ in range(20):
        updates = []
        for u in honest:
            kinds = rng.sample(list(BAD), rng.randint(0, 3))  # all in the first module
            for kind in sorted(kinds, key=lambda k: k in ("integer delta", "missing module")):
                u = corrupt(kind, u, 4)
            if rng.random() < 0.5:  # and a repeated rank in the last module
                last = list(u.sketches)[-1]
                index = u.sketches[last].indices
                u = dataclasses.replace(u, sketches=u.sketches | {
                    last: with_index(u.sketches[last], index[:1].repeat(len(index)))})
            updates.append(u)
        want_good, want_bad = [], []
        for pos, (u, sent) in enumerate(zip(updates, downs)):
            try:
                check_update(u, pos, sent, 4)
                want_good.append(pos)
            except BadUpdate as err:
                want_bad.append((pos, str(err)))
        assert screen_updates(updates, clients, downs, 4) == (want_good, want_bad)


@pytest.mark.slow
def test_a_64_client_round_outside_local_training_stays_within_its_operation_budget():
    """The default model's 4 blocks of 6 LoRA modules (narrow, for speed: the count depends on
    the modules and the clients, not the widths), 64 clients in one pass."""
    counted = host_round(64, 16, model_cfg=ModelConfig(d_model=16, n_head=2))
    assert counted["ops"] <= HOST_OPS_BUDGET and counted["syncs"] == 0, counted
