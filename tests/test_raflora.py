"""fslora_min/raflora.py: the rank-partition weights, the partitioned global update against a
float64 per-index sum, FlexLoRA when every rank is equal, and the linear task's fixed point
(each rank index kept whole, where FlexLoRA shrinks it by its coverage)."""

from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from fslora_min.client import ClientUpdate
from fslora_min.linear import LinearConfig, measured_fraction, run_linear, settled
from fslora_min.lora import CompactFactors, LoRALinear
from fslora_min.methods import client_products
from fslora_min.raflora import RaFLoRA, partition_weights, partitioned_products
from fslora_min.registry import make_method
from fslora_min.server import Server, ServerConfig
from fslora_min.sketch import Sketch


def test_partition_weights_renormalise_each_rank_index_over_its_holders():
    w = partition_weights([1, 2, 4], [0.5, 0.25, 0.25])  # P_j = 1, 0.5, 0.25, 0.25
    assert [t.tolist() for t in w] == [[0.5], [0.25, 0.5], [0.25, 0.5, 1.0, 1.0]]


def round_of(ranks: list[int], sizes: list[int], seed: int = 0):
    """A one-module server (float64, R = 6) and one round's downlinks and uploads."""
    g = torch.Generator().manual_seed(seed)
    model = nn.ModuleDict({"l": LoRALinear(nn.Linear(5, 4, bias=False, dtype=torch.float64), 6,
                                           6.0, generator=g)})
    server = Server(model, ServerConfig())
    downlinks, updates = [], []
    for i, (k, n) in enumerate(zip(ranks, sizes)):
        sk = Sketch(torch.arange(k), 6, weight=6 / k)
        b, a = (torch.randn(4, k, generator=g, dtype=torch.float64),
                torch.randn(k, 5, generator=g, dtype=torch.float64))
        downlinks.append({"l": CompactFactors(b, a, sk)})
        updates.append(ClientUpdate(i, {"l": sk}, {"l": (0.1 * torch.randn(4, k, generator=g,
                                                                            dtype=torch.float64),
                                                         0.1 * torch.randn(k, 5, generator=g,
                                                                           dtype=torch.float64))},
                                    n, 0))
    return server, downlinks, updates


def test_partitioned_update_is_the_per_index_average_over_the_clients_holding_it():
    ranks, sizes = [1, 3, 3, 6], [10, 30, 20, 40]
    server, downlinks, updates = round_of(ranks, sizes)
    p = [n / sum(sizes) for n in sizes]
    want = torch.zeros(4, 5, dtype=torch.float64)
    for j in range(6):
        holders = [i for i, k in enumerate(ranks) if k > j]
        cover = sum(p[i] for i in holders)
        for i in holders:
            f, (db, da) = downlinks[i]["l"], updates[i].deltas["l"]
            s_i = server.modules["l"].scale * f.sketch.sketch_weight
            want += p[i] / cover * s_i * torch.outer((f.b + db)[:, j], (f.a + da)[j])
    got = partitioned_products(server, updates, downlinks)["l"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_equal_ranks_make_raflora_flexlora():
    server, downlinks, updates = round_of([3, 3, 3], [10, 30, 20], seed=1)
    torch.testing.assert_close(partitioned_products(server, updates, downlinks)["l"],
                               client_products(server, updates, downlinks)["l"],
                               rtol=1e-12, atol=1e-12)
    assert isinstance(make_method("raflora", 6, torch.Generator()), RaFLoRA)


@pytest.mark.slow
def test_on_the_linear_task_no_rank_index_collapses():
    """FlexLoRA's l-th singular value shrinks to pi_l sigma_l (theory/sketch_bias.py); with
    each index renormalised it stays sigma_l for l <= max k_i: the fraction left is that of the
    ranks no client holds, (R* - max k_i) / R*."""
    cfg = LinearConfig(m=6, n=6, target_rank=4, rank=4, alpha=4.0, client_ranks=(1, 3),
                       samples=8, rounds=150, lr=0.1, method="raflora")
    curve = run_linear(cfg)["curve"]
    assert settled(curve) and measured_fraction(curve) == pytest.approx(1 / 4, abs=0.02)
    flex = run_linear(replace(cfg, method="flexlora"))["curve"]
    assert measured_fraction(flex) > measured_fraction(curve) + 0.1
