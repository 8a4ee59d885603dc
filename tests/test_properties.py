"""Randomised property tests (seeded, many cases) of sketch sampling, aggregation and update
screening over random r, k, shapes and client counts.

Each test draws its cases from one seeded generator, so a failure replays exactly; the case
is in the assertion message.
"""

import random

import pytest
import torch
import torch.nn as nn

from fslora_min.client import ClientUpdate
from fslora_min.lora import CompactFactors, LoRALinear
from fslora_min.server import AGGREGATIONS, Server, ServerConfig, average_padded_deltas
from fslora_min.sketch import Sketch, sample_index_set, sample_module_sketches
from fslora_min.validation import BadUpdate, check_update
from tests.corruptions import BAD, corrupt


def cases(seed: int, n: int, max_r: int = 24) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.randint(1, max_r)
        out.append((r, rng.randint(1, r)))
    return out


def test_index_sets_have_size_k_distinct_in_range_sorted():
    g = torch.Generator().manual_seed(0)
    for r, k in cases(0, 500):
        index = sample_index_set(r, k, g)
        assert index.dtype == torch.int64 and index.shape == (k,), (r, k)
        assert index.unique().numel() == k, (r, k, index)
        assert 0 <= int(index.min()) and int(index.max()) < r, (r, k, index)
        assert torch.equal(index, index.sort().values), (r, k, index)


def test_module_sketches_are_independent_draws_per_module():
    g = torch.Generator().manual_seed(1)
    names = [f"m{j}" for j in range(6)]
    for r, k in cases(1, 100):
        sketches = sample_module_sketches(names, r, k, g)
        assert list(sketches) == names
        assert all(s.k == k and s.rank == r and s.sketch_weight == r / k for s in sketches.values())
    # with r = 8, k = 4 the 6 modules share one index set with probability C(8,4)^-5: never
    sets = {tuple(s.indices.tolist()) for s in sample_module_sketches(names, 8, 4, g).values()}
    assert len(sets) > 1


@pytest.mark.parametrize("seed", range(3))
def test_every_index_is_drawn_with_probability_k_over_r(seed):
    """Uniform marginals P(j in I) = k/r, and pairs P(i, j in I) = k(k-1)/(r(r-1)), within 5
    standard deviations of the binomial count over 3000 draws."""
    g, draws = torch.Generator().manual_seed(100 + seed), 3000
    for r, k in cases(100 + seed, 4, max_r=10):
        hits = torch.zeros(r, r)
        for _ in range(draws):
            x = torch.zeros(r)
            x[sample_index_set(r, k, g)] = 1
            hits += torch.outer(x, x)  # diagonal: singles; off-diagonal: pairs
        p1 = k / r
        p2 = k * (k - 1) / (r * (r - 1)) if r > 1 else 0.0
        expected = torch.full((r, r), p2 * draws).fill_diagonal_(p1 * draws)
        p = expected / draws
        sigma = (draws * p * (1 - p)).sqrt().clamp_min(1e-9)
        z = ((hits - expected).abs() / sigma).max().item()
        assert z < 5, (r, k, z)


def random_round(rng: random.Random, g: torch.Generator, r: int, m: int, n: int):
    """Random sketches and float64 deltas for 1..5 clients of random ranks k_i."""
    updates = []
    for i in range(rng.randint(1, 5)):
        k = rng.randint(1, r)
        sk = Sketch(sample_index_set(r, k, g), r)
        d = (torch.randn(m, k, generator=g, dtype=torch.float64),
             torch.randn(k, n, generator=g, dtype=torch.float64))
        updates.append(ClientUpdate(i, {"l": sk}, {"l": d}, 1, 0))
    return updates


def scaled(updates: list[ClientUpdate], alpha: float, other: list[ClientUpdate],
           beta: float) -> list[ClientUpdate]:
    """Updates with the same sketches and deltas alpha d + beta e."""
    return [ClientUpdate(u.client_id, u.sketches,
                         {"l": tuple(alpha * x + beta * y for x, y in zip(u.deltas["l"],
                                                                          v.deltas["l"]))},
                         1, 0)
            for u, v in zip(updates, other)]


@pytest.mark.parametrize("normalizer", AGGREGATIONS)
def test_aggregation_is_linear_order_free_and_leaves_undrawn_ranks_at_zero(normalizer):
    rng, g = random.Random(7), torch.Generator().manual_seed(7)
    for case in range(150):
        r, m, n = rng.randint(1, 12), rng.randint(1, 6), rng.randint(1, 6)
        d = random_round(rng, g, r, m, n)
        e = [ClientUpdate(u.client_id, u.sketches,
                          {"l": tuple(torch.randn_like(t) for t in u.deltas["l"])}, 1, 0)
             for u in d]
        alpha, beta = rng.uniform(-2, 2), rng.uniform(-2, 2)
        (Db, Da), (Eb, Ea) = (average_padded_deltas(x, r, normalizer)["l"] for x in (d, e))
        Lb, La = average_padded_deltas(scaled(d, alpha, e, beta), r, normalizer)["l"]
        torch.testing.assert_close(Lb, alpha * Db + beta * Eb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(La, alpha * Da + beta * Ea, rtol=1e-12, atol=1e-12)
        Rb, Ra = average_padded_deltas(d[::-1], r, normalizer)["l"]
        torch.testing.assert_close(Rb, Db, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Ra, Da, rtol=1e-12, atol=1e-12)
        drawn = sorted({j for u in d for j in u.sketches["l"].indices.tolist()})
        undrawn = [j for j in range(r) if j not in drawn]
        assert not Db[:, undrawn].any() and not Da[undrawn].any(), (case, undrawn)


def test_server_step_moves_exactly_the_drawn_ranks_by_the_average():
    rng, g = random.Random(8), torch.Generator().manual_seed(8)
    for case in range(60):
        r, m, n = rng.randint(1, 10), rng.randint(1, 6), rng.randint(1, 6)
        model = nn.ModuleDict({"l": LoRALinear(nn.Linear(n, m).double(), r, alpha=float(r),
                                               generator=g)})
        with torch.no_grad():
            model["l"].lora_B.normal_(generator=g)
        server = Server(model, ServerConfig())
        B0, A0 = model["l"].lora_B.detach().clone(), model["l"].lora_A.detach().clone()
        updates = random_round(rng, g, r, m, n)
        Db, Da = average_padded_deltas(updates, r)["l"]
        server.apply_updates(updates)
        drawn = sorted({j for u in updates for j in u.sketches["l"].indices.tolist()})
        undrawn = [j for j in range(r) if j not in drawn]
        B, A = model["l"].lora_B.detach(), model["l"].lora_A.detach()
        assert torch.equal(B[:, undrawn], B0[:, undrawn]) and torch.equal(A[undrawn], A0[undrawn])
        torch.testing.assert_close(B, B0 + Db, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(A, A0 + Da, rtol=1e-12, atol=1e-12)
        counts = torch.zeros(r, dtype=torch.long)
        for u in updates:
            counts[u.sketches["l"].indices] += 1
        assert torch.equal(server.coverage["l"], counts), case


def test_screening_accepts_every_honest_update_and_rejects_every_single_corruption():
    rng, g = random.Random(9), torch.Generator().manual_seed(9)
    for case in range(200):
        r, m, n = rng.randint(2, 10), rng.randint(2, 6), rng.randint(2, 6)
        update = random_round(rng, g, r, m, n)[0]
        sk = update.sketches["l"]
        sent = {"l": CompactFactors(torch.zeros(m, sk.k, dtype=torch.float64),
                                    torch.zeros(sk.k, n, dtype=torch.float64), sk)}
        check_update(update, update.client_id, sent, r)  # honest: no exception
        kind = rng.choice(list(BAD))
        if (kind, sk.k) in (("not the sent set", r), ("duplicated", 1)):
            continue  # no other set of k ranks exists / one rank cannot repeat
        with pytest.raises(BadUpdate):
            check_update(corrupt(kind, update, r), update.client_id, sent, r)
