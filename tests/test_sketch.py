"""Sketch sampling and client ranks: ranges, uniqueness, seeding, and errors that name values."""

import pytest
import torch

from fslora_min.ranks import (rank_from_ratio, ranks_from_distribution, ranks_from_ratios,
                                validate_ranks)
from fslora_min.rng import randperms
from fslora_min.sketch import Sketch, sample_module_sketches, sample_sketch


def test_sampled_index_sets_are_distinct_in_range_and_uniform():
    g = torch.Generator().manual_seed(0)
    r, k, draws = 8, 3, 4000
    counts = torch.zeros(r)
    for _ in range(draws):
        sk = sample_sketch(r, k, g)
        assert sk.k == k and sk.indices.unique().numel() == k
        assert 0 <= int(sk.indices.min()) and int(sk.indices.max()) < r
        counts[sk.indices] += 1
    # each index has inclusion probability k/r; 5 standard deviations of a binomial
    p = k / r
    assert torch.all((counts / draws - p).abs() < 5 * (p * (1 - p) / draws) ** 0.5)


def test_one_sketch_per_module_and_seeded_replay():
    names = ["a", "b", "c"]
    s1 = sample_module_sketches(names, 16, 4, torch.Generator().manual_seed(5))
    s2 = sample_module_sketches(names, 16, 4, torch.Generator().manual_seed(5))
    s3 = sample_module_sketches(names, 16, 4, torch.Generator().manual_seed(6))
    assert list(s1) == names
    assert all(torch.equal(s1[n].indices, s2[n].indices) for n in names)
    assert any(not torch.equal(s1[n].indices, s3[n].indices) for n in names)
    assert s1["a"].sketch_weight == 4.0


@pytest.mark.parametrize("r,k,needle", [(0, 1, "r=0"), (-3, 1, "r=-3"), (4, 0, "k=0"),
                                        (4, 5, "k=5")])
def test_bad_rank_pairs_name_the_value(r, k, needle):
    with pytest.raises(ValueError, match=needle):
        sample_sketch(r, k, torch.Generator())


def test_bad_index_sets_are_rejected():
    with pytest.raises(ValueError, match="repeated"):
        Sketch(torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="out of range"):
        Sketch(torch.tensor([0, 4]), 4)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_an_error(ratio):
    with pytest.raises(ValueError, match="ratio"):
        rank_from_ratio(ratio, 16)


def test_ratio_too_small_for_rank_is_an_error_not_a_clip():
    with pytest.raises(ValueError, match="k=0"):
        rank_from_ratio(1 / 8, 2)
    assert ranks_from_ratios([1 / 8, 1 / 4, 1 / 2, 3 / 4], 6, 64) == [8, 16, 32, 48, 8, 16]


@pytest.mark.parametrize("kind", ["uniform", "normal", "heavy-small"])
def test_rank_distributions_stay_in_range_and_replay(kind):
    ranks = ranks_from_distribution(kind, 200, 16, seed=1)
    assert min(ranks) >= 1 and max(ranks) <= 16
    assert ranks == ranks_from_distribution(kind, 200, 16, seed=1)
    if kind == "heavy-small":
        assert sum(k <= 4 for k in ranks) > sum(k > 12 for k in ranks)
    with pytest.raises(ValueError, match="client 1"):
        validate_ranks([2, 17], 16)
    with pytest.raises(ValueError, match="'zipf'"):
        ranks_from_distribution("zipf", 3, 16, seed=0)


def test_batched_draws_are_torch_randperm_number_for_number_and_leave_the_stream_alike():
    """randperms(r, count, g) = count calls of torch.randperm(r, generator=g), and g ends in the
    same state, from a fresh seed and from a stream already part-way through its words."""
    for seed, r, count, before in [(0, 16, 24, 0), (1, 2, 5, 3), (2, 64, 7, 700), (3, 1, 4, 0),
                                   (4, 7, 200, 623)]:
        g, h = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.rand(before, generator=g), torch.rand(before, generator=h)
        want = torch.stack([torch.randperm(r, generator=g) for _ in range(count)]).numpy()
        assert (randperms(r, count, h) == want).all()
        assert torch.equal(g.get_state(), h.get_state())
        assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=h))
