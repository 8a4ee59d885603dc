"""fslora_min/planted.py: the planted update has rank R*, lies on the top principal input
directions with equal effect per direction, and only the teacher's continuation is resampled;
the task (fslora_min/tasks.py) builds its data once, from the synthetic split and the base."""

from dataclasses import asdict

import pytest
import torch

from fslora_min.data import (DataConfig, make_federated_data, pretraining_batches,
                             split_inputs_targets)
from fslora_min.federation import evaluate
from fslora_min.model import TEST_CONFIG, Transformer, lm_loss
from fslora_min.planted import (PlantedConfig, PlantedDataConfig, layer_inputs, make_teacher,
                                planted_delta, planted_kl)
from fslora_min.tasks import federated_data, on_base, task_name

DATA = DataConfig(vocab_size=TEST_CONFIG.vocab_size, seq_len=TEST_CONFIG.context,
                  n_base_topics=3, successors=2, train_seqs=6, heldout_seqs=2,
                  global_heldout_seqs=5, seed=int(torch.randint(1000, ())))
CFG = PlantedConfig(layer="blocks.0.mlp.proj", rank=3, strength=0.7, prefix=2, probe_seqs=16,
                    train_seqs=DATA.train_seqs)
TASK = PlantedDataConfig(**asdict(DATA), planted=CFG)


def test_planted_delta_has_equal_effect_along_the_top_principal_directions():
    x = torch.randn(500, 12, dtype=torch.float64) * torch.linspace(3, 0.1, 12)  # (tokens, n)
    w = torch.randn(6, 12)
    delta = planted_delta(w, x, CFG, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(delta).item() == CFG.rank
    eigval, eigvec = torch.linalg.eigh(x.T @ x / len(x))
    top = eigvec[:, -CFG.rank:]
    assert torch.allclose(delta @ top @ top.T, delta, atol=1e-10)  # row space = top directions
    effect = (x @ top).pow(2).mean(0).sqrt() * (delta @ top).norm(dim=0)  # sigma_j ||Delta v_j||
    assert torch.allclose(effect, effect.mean().expand_as(effect), rtol=1e-8)
    total = (x @ delta.T).norm(dim=1).pow(2).mean().sqrt()
    out = (x @ w.double().T).norm(dim=1).pow(2).mean().sqrt()
    assert torch.isclose(total / out, torch.tensor(CFG.strength, dtype=torch.float64), rtol=1e-8)


def test_teacher_changes_one_layer_and_continues_the_clients_prefixes():
    base = Transformer(TEST_CONFIG).eval()
    teacher = make_teacher(base, DATA, CFG)
    changed = [n for (n, p), q in zip(base.named_parameters(), teacher.parameters())
               if not torch.equal(p, q)]
    assert changed == [f"{CFG.layer}.weight"]
    layer = base.get_submodule(CFG.layer)
    probe = next(pretraining_batches(DATA, CFG.probe_seqs, DATA.seed))
    assert layer_inputs(base, layer, probe).shape == (CFG.probe_seqs * DATA.seq_len, 4 * 16)
    assert task_name(TASK) == "planted"
    planted = on_base(TASK, federated_data(TASK, 3), base)
    markov = make_federated_data(DATA, 3)
    for p, m in zip(planted.clients, markov.clients):
        assert torch.equal(p.train[:, :CFG.prefix], m.train[:, :CFG.prefix])
        assert not torch.equal(p.train, m.train)
    again = on_base(TASK, federated_data(TASK, 3), base)
    assert torch.equal(again.global_heldout, planted.global_heldout)  # seeded


def test_the_planted_config_refuses_a_prefix_without_teacher_tokens_and_two_sizes():
    with pytest.raises(ValueError, match="leaves no teacher tokens"):
        PlantedDataConfig(**asdict(DATA), planted=PlantedConfig(prefix=DATA.seq_len,
                                                                train_seqs=DATA.train_seqs))
    with pytest.raises(ValueError, match="differs from the data's train_seqs"):
        PlantedDataConfig(**asdict(DATA), planted=PlantedConfig(train_seqs=7))


def test_only_the_teacher_targets_are_scored_in_training_and_held_out():
    """scored_from = prefix - 1: the targets before it are prefix tokens. lm_loss (plain and per
    group) and evaluate count exactly the targets >= scored_from (a float64 reference)."""
    base = Transformer(TEST_CONFIG).eval()
    planted = on_base(TASK, federated_data(TASK, 3), base)  # the teacher writes in float32
    assert planted.scored_from == CFG.prefix - 1
    base.double()
    seqs = planted.global_heldout
    x, y = split_inputs_targets(seqs)
    s = planted.scored_from + int(torch.randint(1, 3, ()))  # any cut, not just the task's
    logp = base(x).log_softmax(-1)  # (N, t, V)
    nll = -logp.gather(-1, y[..., None]).squeeze(-1)  # (N, t)
    ref = nll[:, s:].mean()
    assert torch.isclose(lm_loss(base, x, y, scored_from=s), ref, rtol=1e-12)
    groups = lm_loss(base, x[:4], y[:4], groups=2, scored_from=s)
    assert torch.allclose(groups, nll[:4, s:].reshape(2, -1).mean(1), rtol=1e-12)
    loss, acc = evaluate(base, seqs, batch_size=2, scored_from=s)
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    hits = (logp.argmax(-1) == y)[:, s:].double().mean().item()
    assert acc == pytest.approx(hits, rel=1e-12)
    assert evaluate(base, seqs)[0] == pytest.approx(nll.mean().item(), rel=1e-12)


def test_planted_kl_is_the_mean_kl_over_scored_targets():
    base = Transformer(TEST_CONFIG).eval()
    seqs = on_base(TASK, federated_data(TASK, 2), base).global_heldout
    teacher = make_teacher(base, DATA, CFG).double()
    base.double()
    x = split_inputs_targets(seqs)[0]
    p, q = teacher(x).softmax(-1)[:, 2:], base(x).softmax(-1)[:, 2:]
    ref = (p * (p / q).log()).sum(-1).mean().item()
    assert planted_kl(teacher, base, seqs, 2) == pytest.approx(ref, rel=1e-10)
    assert planted_kl(teacher, base, seqs, 2) > 0
    assert planted_kl(base, base, seqs, 2) == 0.0
