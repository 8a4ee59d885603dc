"""Reliability (issue 7): bit-identical resume (also after SIGKILL of the real CLI), checkpoints
that refuse to load when truncated, tampered or from another run, screening of bad client
updates, and clients that drop out mid-round."""

import copy
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fslora_min.federation as federation_module
from fslora_min.checkpoint import (CHECKPOINT_NAME, MAGIC, CheckpointError, read_payload,
                                   save_checkpoint)
from fslora_min.engine import train_clients
from fslora_min.experiment import run_experiment
from fslora_min.federation import Federation
from fslora_min.sealed import HEADER

from tests.corruptions import BAD, corrupt
from tests.tiny import tiny_experiment, tiny_federation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One pretraining cache for the module (the tiny base model takes about a second)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("FSLORA_CACHE", str(path))
        yield path


def without_timing(history: dict) -> dict:
    return history | {"rounds": [{k: v for k, v in r.items() if k != "seconds"}
                                 for r in history["rounds"]]}


def final_state(out: Path) -> dict:
    return read_payload(out / CHECKPOINT_NAME)["federation"]


def assert_same_model(a: dict, b: dict) -> None:
    model_a, model_b = a["server"]["model"], b["server"]["model"]
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)


# --- resume -------------------------------------------------------------------------------------

CLI_RUN = ["run", "--preset", "tiny", "--clients", "4", "--participants", "3", "--rank", "4",
           "--rounds", "40", "--local-steps", "2", "--batch-size", "4", "--lora-alpha", "8",
           "--lr", "0.3", "--dropout", "0.2", "--server-optimizer", "adam", "--global-lr",
           "0.01", "--checkpoint-every", "1", "--no-progress"]


def start_cli(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"FSLORA_CACHE": str(cache), "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fslora_min", *CLI_RUN, "--out", str(out),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.slow
def test_cli_killed_with_sigkill_then_resumed_is_bit_identical(tmp_path, cache):
    reference = start_cli(tmp_path / "ref", cache)  # also fills the pretraining cache
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()
    victim = start_cli(tmp_path / "run", cache)
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL  # killed, not finished
    done = len(final_state(tmp_path / "run")["history"]["rounds"])
    assert 1 <= done < 40 and not (tmp_path / "run" / "metrics.json").exists()
    resumed = start_cli(tmp_path / "run", cache, "--resume")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()
    ref, run = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ref", "run"))
    assert without_timing(run["history"]) == without_timing(ref["history"])
    assert run["info"]["client_heldout_loss"] == ref["info"]["client_heldout_loss"]
    assert_same_model(final_state(tmp_path / "run"), final_state(tmp_path / "ref"))


class Interrupt(Exception):
    pass


def run_cut_in_round(cfg, t_cut: int, monkeypatch) -> None:
    """Run `cfg` until an Interrupt raised as round `t_cut` starts (a killed process)."""
    play = Federation.run_round

    def crash(self, t):
        if t == t_cut:
            raise Interrupt
        return play(self, t)

    with monkeypatch.context() as mp:
        mp.setattr(Federation, "run_round", crash)
        with pytest.raises(Interrupt):
            run_experiment(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method, server_optimizer, dropout", [
    ("fslora", "sgdm", 0.3), ("flexlora", "avg", 0.0), ("flora", "avg", 0.3)])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(method, server_optimizer, dropout,
                                                              tmp_path, monkeypatch):
    def config(out: str):
        cfg = tiny_experiment(out, rounds=5, participants=3, dropout=dropout)
        return dataclasses.replace(cfg, method=method, checkpoint_every=2,
                                   server=dataclasses.replace(cfg.server,
                                                              optimizer=server_optimizer))

    full, _ = run_experiment(config(str(tmp_path / "full")), progress=False)
    run_cut_in_round(config(str(tmp_path / "cut")), 3, monkeypatch)
    assert len(final_state(tmp_path / "cut")["history"]["rounds"]) == 2
    resumed, _ = run_experiment(config(str(tmp_path / "cut")), progress=False, resume=True)
    assert without_timing(resumed.to_dict()) == without_timing(full.to_dict())
    assert_same_model(final_state(tmp_path / "cut"), final_state(tmp_path / "full"))


def test_minibatch_stream_state_round_trips():
    fedn = tiny_federation([2, 4], 4)
    stream = fedn.batch_streams[0]
    for _ in range(5):  # part-way through the second epoch (12 rows, batches of 4)
        next(stream)
    saved = copy.deepcopy(stream.state_dict())
    ahead = [next(stream) for _ in range(7)]
    stream.load_state_dict(saved)
    assert all(torch.equal(a, next(stream)) for a in ahead)


# --- broken checkpoints -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    cfg = dataclasses.replace(tiny_experiment(str(out), rounds=2), checkpoint_every=1)
    run_experiment(cfg, progress=False)
    return out


def forge(path: Path, payload_obj: object) -> None:
    """A checkpoint with a valid header and digest around any torch.save-able object."""
    buffer = io.BytesIO()
    torch.save(payload_obj, buffer)
    payload = buffer.getvalue()
    path.write_bytes(MAGIC + len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest()
                     + payload)


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # what an unsafe torch.load would execute


def damage(kind: str, raw: bytes, path: Path) -> None:
    if kind == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "tampered":
        flipped = bytearray(raw)
        flipped[HEADER + len(raw) // 2 - HEADER // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif kind == "not a checkpoint":
        path.write_bytes(b"PK\x03\x04 a zip file, or anything else")
    elif kind == "code":
        forge(path, {"version": 1, "config": {}, "federation": RunsCode(path.with_suffix(".pwn"))})
    elif kind == "other keys":
        forge(path, {"weights": torch.zeros(3)})
    elif kind == "other version":
        forge(path, {"version": 99, "config": {}, "federation": {}})
    elif kind == "missing":
        path.unlink()


@pytest.mark.parametrize("kind, needle", [
    ("truncated", "is truncated"),
    ("tampered", "corrupted or tampered with: SHA-256 mismatch"),
    ("not a checkpoint", "is not an fslora-min checkpoint"),
    ("code", "refused to unpickle it (weights_only)"),
    ("other keys", "has top-level keys ['weights']"),
    ("other version", "format version 99"),
    ("missing", "no checkpoint at"),
])
def test_damaged_checkpoint_is_refused_with_a_clear_error(kind, needle, saved_run, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    path = out / CHECKPOINT_NAME
    raw = (saved_run / CHECKPOINT_NAME).read_bytes()
    path.write_bytes(raw)
    damage(kind, raw, path)
    cfg = tiny_experiment(str(out), rounds=2)
    with pytest.raises(CheckpointError) as err:
        run_experiment(cfg, progress=False, resume=True)
    assert needle in str(err.value)
    assert not path.with_suffix(".pwn").exists()  # the pickled call never ran


@pytest.mark.parametrize("change, needle", [
    (lambda c: dataclasses.replace(c, lora=dataclasses.replace(c.lora, rank=8)),
     "lora.rank: checkpoint 4, this run 8"),
    (lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, d_model=32)),
     "model.d_model: checkpoint 16, this run 32"),
    (lambda c: dataclasses.replace(c, method="flora"), "method: checkpoint 'fslora'"),
])
def test_checkpoint_of_another_configuration_is_refused(change, needle, saved_run):
    cfg = change(tiny_experiment(str(saved_run), rounds=2))
    with pytest.raises(CheckpointError, match="another configuration") as err:
        run_experiment(cfg, progress=False, resume=True)
    assert needle in str(err.value)


def test_state_of_another_rank_is_refused_naming_the_tensor(tmp_path):
    small, large = tiny_federation([2, 4], 4), tiny_federation([2, 4], 8)
    save_checkpoint(tmp_path / "c.pt", {}, small.state_dict())
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 16\) in the checkpoint but "
                                         r"\(8, 16\) in this run"):
        large.load_state_dict(read_payload(tmp_path / "c.pt")["federation"])


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"round": 1}, {"x": torch.ones(3)})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the crash comes after the temporary file
    with pytest.raises(OSError):
        save_checkpoint(path, {"round": 2}, {"x": torch.zeros(3)})
    assert read_payload(path)["config"] == {"round": 1}


# --- bad client updates -------------------------------------------------------------------------

def round_of_updates(fedn: Federation):
    """Three participants' real downlinks and updates, from the federation's own streams."""
    server, clients = fedn.server, [0, 1, 2]
    downs = [server.downlink(fedn.method.sketches(server, fedn.client_ranks[i], fedn.sketch_stream))
             for i in clients]
    updates = train_clients("sequential", server.model, clients, downs,
                            [fedn.batch_streams[i] for i in clients], fedn.client_cfg,
                            [12] * 3)
    return clients, downs, updates


def same_factors(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_update_is_rejected_and_the_model_is_what_the_good_ones_give(kind):
    fedn = tiny_federation([2, 2, 2], 4)
    clients, downs, updates = round_of_updates(fedn)
    reference = copy.deepcopy(fedn.server)
    fedn.method.aggregate(reference, [updates[0], updates[2]], [downs[0], downs[2]])
    updates[1] = corrupt(kind, updates[1], 4)
    rejected = fedn.aggregate(updates, clients, downs)
    assert [c for c, _ in rejected] == [1] and BAD[kind] in rejected[0][1]
    assert same_factors(fedn.server, reference)
    assert all(torch.equal(fedn.server.coverage[n], c) for n, c in reference.coverage.items())


def test_round_with_only_bad_updates_leaves_the_model_unchanged():
    fedn = tiny_federation([2, 2, 2], 4)
    clients, downs, updates = round_of_updates(fedn)
    before = copy.deepcopy(fedn.server)
    bad = [corrupt(kind, u, 4) for kind, u in zip(["nan", "duplicated", "out of range"], updates)]
    assert len(fedn.aggregate(bad, clients, downs)) == 3
    assert same_factors(fedn.server, before)


def test_round_goes_on_after_a_rejection_and_logs_and_counts_it(monkeypatch, caplog):
    fedn = tiny_federation([2, 2, 2], 4)

    def poisoned(engine, model, ids, *args):
        updates = train_clients(engine, model, ids, *args)
        return [corrupt("nan", u, 4) if u.client_id == 1 else u for u in updates]

    monkeypatch.setattr(federation_module, "train_clients", poisoned)
    history = fedn.run(progress=False)
    assert len(history.rounds) == 3
    assert all(r.rejected == [1] and "non-finite" in r.reasons[0] for r in history.rounds)
    assert "rejected the update of client 1" in caplog.text
    assert all(torch.isfinite(p).all() for p in fedn.server.model.parameters())


# --- dropout ------------------------------------------------------------------------------------

def test_dropped_clients_are_skipped_and_the_rest_are_averaged(monkeypatch):
    fedn = tiny_federation([2, 3, 4, 4], 4)
    fedn.fed = dataclasses.replace(fedn.fed, dropout=0.5, rounds=6)
    seen, partial = [], 0

    def spy(engine, model, ids, downs, *args):
        updates = train_clients(engine, model, ids, downs, *args)
        seen.append((ids, downs, updates))
        return updates

    monkeypatch.setattr(federation_module, "train_clients", spy)
    for t in range(1, 7):
        before = copy.deepcopy(fedn.server)
        record = fedn.run_round(t)
        ids, downs, updates = seen[-1]
        assert ids == [i for i in record.participants if i not in record.dropped]
        assert all(record.numbers_up[record.participants.index(i)] == 0 for i in record.dropped)
        if ids:
            fedn.method.aggregate(before, updates, downs)  # the mean over the reporters only
        assert same_factors(fedn.server, before)
        partial += 0 < len(record.dropped) < len(record.participants)
    assert partial >= 2  # rounds that averaged over some but not all participants


def test_round_where_everyone_drops_keeps_the_model_and_the_run_goes_on():
    fedn = tiny_federation([2, 2, 2, 2], 4)
    fedn.fed = dataclasses.replace(fedn.fed, dropout=0.9, participants=2, rounds=6)
    empty = 0
    for t in range(1, 7):
        before = copy.deepcopy(fedn.server)
        record = fedn.run_round(t)
        if record.dropped == record.participants:
            empty += 1
            assert same_factors(fedn.server, before) and record.numbers_up == [0, 0]
    assert empty >= 2  # P(all of 2 drop) = 0.81 per round


def test_dropout_rate_matches_its_probability(monkeypatch):
    monkeypatch.setattr(federation_module, "train_clients", lambda *args: [])  # no training
    fedn = tiny_federation([1, 1, 1, 1], 4)
    fedn.fed = dataclasses.replace(fedn.fed, dropout=0.25, rounds=200, eval_every=1000)
    history = fedn.run(progress=False)
    draws = 200 * 4
    dropped = sum(len(r.dropped) for r in history.rounds)
    sigma = (draws * 0.25 * 0.75) ** 0.5
    assert abs(dropped - draws * 0.25) < 4 * sigma
