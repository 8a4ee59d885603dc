"""The Shakespeare task: the shipped text and its checksum, the parser on a hand-made snippet,
the LEAF split (no empty client, deterministic by seed, held-out from the end of each role with
no leakage into training windows or the pretraining text), and a tiny federation on it through
the same code path as the synthetic task (run, compare, the Flower app's configuration)."""

import hashlib
import json
import lzma

import numpy as np
import pytest
import torch

from fslora_min.cli import build_parser, config_from_args, main
from fslora_min.client import ClientConfig
from fslora_min.data import DataConfig
from fslora_min.study.config import CompareConfig, task
from fslora_min.experiment import ExperimentConfig, preset, run_experiment
from fslora_min.federation import FederationConfig
from fslora_min.knobs import flag_of, knobs
from fslora_min.lora import LoRAConfig
from fslora_min.shakespeare import (VOCAB, ShakespeareConfig, char_windows, decode, encode,
                                    make_shakespeare_data, parse_play, parsed_plays,
                                    pretraining_text, role_lines,
                                    shakespeare_pretraining_batches, split_lines)
from fslora_min.shakespeare_text import PLAYS_PATH, PLAYS_SHA256, load_plays, strip_play

# Both printings of names, a name followed by a blank line, inline, nested, multi-line, unclosed
# and half-open stage directions, an act and a scene heading, a song's stanza number.
SNIPPET = """\
ACT I.

SCENE I. Elsinore. A platform.

[Enter BERNARDO and FRANCISCO.]

BERNARDO.
Who's there? [Aside.] Stand,
And unfold yourself.

FRANCISCO.

Long live the king!
[Enter two [BRITISH] CAPTAINS,
with drums.]

So late? {Aside.]

[Exit FRANCISCO

FIRST CITIZEN.
Peace, ho!

[They join]
and dance, and vanish.]

SCENE II. A room.

A room with a table.

BERNARDO.
I.

II.

He comes.
"""


def test_parser_finds_roles_lines_and_drops_directions_and_headings():
    assert parse_play(SNIPPET) == [
        ("BERNARDO", "Who's there?  Stand,"), ("BERNARDO", "And unfold yourself."),
        ("FRANCISCO", "Long live the king!"), ("FRANCISCO", "So late?"),
        ("FIRST CITIZEN", "Peace, ho!"), ("BERNARDO", "I.")]


def test_parser_reads_title_case_names_only_in_a_title_case_play():
    title = "Ham.\nAy, madam.\n\nHor.\nMy lord.\n"
    assert role_lines(parse_play(title)) == {"HAM": ["Ay, madam."], "HOR": ["My lord."]}
    caps = "HAMLET.\nAy, madam.\n\nHORATIO.\nMy lord.\n\nAy.\nIt is.\n"
    assert role_lines(parse_play(caps)) == {"HAMLET": ["Ay, madam."],
                                            "HORATIO": ["My lord.", "Ay.", "It is."]}


def test_build_strips_the_front_matter_and_the_end():
    raw = "HAMLET\n\nby William Shakespeare\n\nPERSONS.\nHamlet.\n\nACT I.  \n\nHam.\nO!\n\nTHE END\n"
    assert strip_play(raw, "x") == "ACT I.\n\nHam.\nO!\n"
    with pytest.raises(ValueError, match="no ACT"):
        strip_play("a poem\n", "x")


def test_the_shipped_file_has_its_checksum_and_a_damaged_copy_is_refused(tmp_path):
    data = lzma.decompress(PLAYS_PATH.read_bytes())
    assert hashlib.sha256(data).hexdigest() == PLAYS_SHA256
    plays = load_plays()
    assert len(plays) == 37 and "hamlet" in plays and "sonnets" not in plays
    assert all("gutenberg" not in text.lower() for text in plays.values())
    damaged = tmp_path / "plays.json.xz"
    damaged.write_bytes(lzma.compress(b'{"hamlet":"ACT I.\\n"}'))  # any other text
    with pytest.raises(ValueError, match="damaged"):
        load_plays(damaged)


def test_vocabulary_covers_every_spoken_character_and_round_trips():
    spoken = {c for pairs in parsed_plays().values() for _, line in pairs for c in line}
    assert spoken | {"\n"} == set(VOCAB) and len(set(VOCAB)) == len(VOCAB)
    text = "To be, or not to be:\nthat is the question."
    assert decode(encode(text)) == text
    with pytest.raises(ValueError, match="'~'"):
        encode("a~b")


def test_split_keeps_the_last_lines_out_and_windows_cover_each_part():
    lines = [f"line {i} " + "x" * i for i in range(20)]
    train, held = split_lines(lines, 0.25)
    first = len(lines) - len(held.split("\n"))  # the held-out text is lines[first:]
    assert train + "\n" + held == "\n".join(lines) and held == "\n".join(lines[first:])
    assert len(held) <= 0.25 * len("\n".join(lines)) < len("\n".join(lines[first - 1:]))
    w = char_windows(train, 8)
    assert w.shape[1] == 9 and decode(w[0]) == train[:9]
    assert torch.equal(w[1:, 0], w[:-1, -1])  # stride 8: each window starts where one ends
    assert len(w) == (len(train) - 1) // 8
    assert len(char_windows("short", 8)) == 0


@pytest.fixture(scope="module")
def federation_data():
    return make_shakespeare_data(ShakespeareConfig(seed=0), 8)


def test_clients_are_roles_with_data_and_held_out_from_the_end(federation_data):
    cfg, roles = ShakespeareConfig(), {}
    for play in cfg.federated_plays:
        for role, lines in role_lines(parsed_plays()[play]).items():
            roles[f"{play}/{role}"] = lines
    sizes = set()
    for c in federation_data.clients:
        assert len(c.train) and len(c.heldout) and c.name in roles
        assert len("\n".join(roles[c.name])) >= cfg.min_chars
        train, held = split_lines(roles[c.name], cfg.heldout_fraction)
        assert torch.equal(c.train, char_windows(train, cfg.seq_len))
        assert torch.equal(c.heldout, char_windows(held, cfg.seq_len))
        seen = {tuple(w) for w in c.train.tolist()}
        assert not any(tuple(w) in seen for w in c.heldout.tolist())
        sizes.add(len(c.train))
    assert len(sizes) > 1  # unequal data sizes, as in LEAF
    assert torch.equal(federation_data.global_heldout,
                       torch.cat([c.heldout for c in federation_data.clients]))


def test_the_split_is_deterministic_for_a_seed(federation_data):
    again = make_shakespeare_data(ShakespeareConfig(seed=0), 8)
    other = make_shakespeare_data(ShakespeareConfig(seed=1), 8)
    assert [c.name for c in again.clients] == [c.name for c in federation_data.clients]
    assert all(torch.equal(a.train, b.train) for a, b in zip(again.clients,
                                                              federation_data.clients))
    assert [c.name for c in other.clients] != [c.name for c in federation_data.clients]


def test_the_base_never_reads_a_federated_play(federation_data):
    text = pretraining_text(ShakespeareConfig())
    for c in federation_data.clients:
        assert not any(decode(w) in text for w in c.heldout[:8])
    batch = next(shakespeare_pretraining_batches(ShakespeareConfig(), 4, seed=0))
    assert batch.shape == (4, 65) and all(decode(w) in text for w in batch)


def test_bad_values_are_refused_by_name():
    with pytest.raises(ValueError, match="--clients 1000"):
        make_shakespeare_data(ShakespeareConfig(), 1000)
    with pytest.raises(ValueError, match="not among the plays"):
        make_shakespeare_data(ShakespeareConfig(federated_plays=("hamlet", "hamlett")), 2)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ShakespeareConfig(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="min_chars"):
        ShakespeareConfig(min_chars=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model, data, pretrain = preset("tiny", "shakespeare")[:3]
    cfg = ExperimentConfig(
        ratios=[0.25, 0.5, 1.0], out_dir=str(tmp_path_factory.mktemp("run")), model=model,
        data=data, pretrain=pretrain, lora=LoRAConfig(rank=4, alpha=8.0),
        federation=FederationConfig(num_clients=4, participants=4, rounds=3, seed=0),
        client=ClientConfig(local_steps=8, lr=0.01, optimizer="adamw", batch_size=8))
    return cfg, *run_experiment(cfg, progress=False)


def test_a_tiny_federation_learns_and_reports_every_client(tiny_run):
    cfg, history, info = tiny_run
    assert info["task"] == "shakespeare" and len(set(info["client_names"])) == 4
    data = make_shakespeare_data(cfg.data, 4)
    assert info["client_train_sequences"] == [len(c.train) for c in data.clients]
    sizes = [len(c.heldout) for c in data.clients]  # windows of equal length
    evaluations = [(history.initial_loss, history.initial_acc, history.initial_client_loss,
                    history.initial_client_acc)]
    evaluations += [(r.heldout_loss, r.heldout_acc, r.client_heldout_loss, r.client_heldout_acc)
                    for r in history.rounds]
    assert len(evaluations) == 4
    for loss, acc, client_loss, client_acc in evaluations:
        # the global set pools the clients' held-out windows: its mean is their weighted mean
        assert loss == pytest.approx(np.average(client_loss, weights=sizes), rel=1e-5)
        assert acc == pytest.approx(np.average(client_acc, weights=sizes), rel=1e-9)
    assert history.rounds[-1].heldout_loss < history.initial_loss - 0.002
    assert info["client_heldout_loss"] == history.rounds[-1].client_heldout_loss


def test_the_cli_offers_the_task_and_refuses_what_does_not_fit_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("fslora_min.experiment.load_or_pretrain",
                        lambda *a, **k: pytest.fail("pretraining started"))
    for args, needle in ((["--dirichlet-alpha", "0.3"], "--dirichlet-alpha: sets the synthetic"),
                         (["--clients", "500"], "--clients 500: the Shakespeare task has")):
        with pytest.raises(SystemExit) as exc:
            main(["run", "--task", "shakespeare", "--preset", "tiny", "--out", str(tmp_path),
                  "--no-progress", *args])
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--task", "poems"])
    assert "invalid choice: 'poems'" in capsys.readouterr().err


def test_run_help_for_the_task_lists_only_the_flags_that_apply_to_it(capsys):
    data_flags = [flag_of(f) for f in knobs(DataConfig)]
    assert "--dirichlet-alpha" in data_flags
    for task_name, listed in (("shakespeare", False), ("synthetic", True)):
        with pytest.raises(SystemExit):
            main(["run", "--task", task_name, "--help"])
        out = capsys.readouterr().out
        assert all((f"{flag} " in out) == listed for flag in data_flags), task_name


def test_the_tiny_preset_improves_the_held_out_loss(capsys, tmp_path):
    """The quick run of issue 31: the preset's steps must suit the task (lr 0.2 made it worse)."""
    assert main(["run", "--task", "shakespeare", "--preset", "tiny", "--clients", "4",
                 "--rounds", "20", "--no-progress", "--out", str(tmp_path)]) == 0
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert history["rounds"][-1]["heldout_loss"] < history["initial_loss"] - 0.01


def test_compare_and_the_flower_app_build_the_same_task():
    exp = task(CompareConfig(task="shakespeare"))
    assert isinstance(exp.data, ShakespeareConfig) and exp.model.vocab_size == len(VOCAB)
    with pytest.raises(ValueError, match="task: must be one of"):
        CompareConfig(task="poems")
    pytest.importorskip("flwr", reason="flwr is not installed: it is an optional extra")
    from fslora_flower.config import experiment_config
    cfg = experiment_config({"fslora-args": "--task shakespeare --preset tiny --clients 3"})
    assert cfg.data == preset("tiny", "shakespeare")[1]


def test_the_shakespeare_preset_sets_its_own_steps_and_flags_override_them():
    args = build_parser().parse_args(["run", "--task", "shakespeare"])
    cfg = config_from_args(args)
    want = preset("default", "shakespeare")
    assert (cfg.client.lr, cfg.server.server_lr) == (want.client.lr, want.server.server_lr)
    assert want.client.lr != ClientConfig().lr  # not the synthetic demo's lr
    args = build_parser().parse_args(["run", "--task", "shakespeare", "--lr", "0.3"])
    cfg = config_from_args(args)
    assert cfg.client.lr == 0.3 and cfg.server.server_lr == want.server.server_lr
