"""FSLoRA on Flower's deployment runtime (flower_app/) against the in-process federation.

A real SuperLink and SuperNodes run as subprocesses on 127.0.0.1 (fslora_flower/local.py),
and `flwr run` submits the app. The same arguments and seed give the same base, data, sketches
and minibatch draws, so the global factors must equal the in-process run's to float tolerance
(relative 1e-6; in practice they are bit-identical: the same float32 operations, one thread).
Each message must carry exactly the in-process accounting, k_i (m + n) numbers of 4 bytes, as
its payload, and its measured size (index sets, names, Flower's framing) only a little more.
`--batch-size 4` makes every minibatch draw matter (12 sequences per client), so a client that
lost its stream state between rounds would train on other batches; `--lr 0.05` keeps the tiny
model out of the chaotic regime in which float32 rounding is amplified step by step.
Skipped, with the reason, where flwr is not installed (requirements-flower.txt).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed: it is an optional extra, "
                                   "pip install -r requirements-flower.txt")

from fslora_flower.codec import (decode_downlink, decode_update, encode_downlink,  # noqa: E402
                                 encode_update)
from fslora_flower.local import LocalDeployment, main as launch  # noqa: E402
from fslora_flower.server_app import RESULT_NAME  # noqa: E402
from fslora_flower.config import UNSUPPORTED_METHODS, experiment_config  # noqa: E402
from fslora_min.engine import train_clients  # noqa: E402
from fslora_min.experiment import build_federation  # noqa: E402
from fslora_min.federation import Federation  # noqa: E402
from fslora_min.lora import global_factors  # noqa: E402

ARGS = ("--preset tiny --rounds 2 --rank 4 --ratios 0.5 1 --engine sequential --seed 3 "
        "--lr 0.05 --batch-size 4")
TOL = 1e-6


def federation_for(clients: int, method: str = "fslora") -> Federation:
    cfg = experiment_config({"fslora-args": f"{ARGS} --clients {clients} --method {method}"})
    return build_federation(cfg, progress=False)[0]


def in_process(clients: int, absent: dict[int, set[int]] | None = None) -> dict:
    """Global factors after the in-process rounds; `absent[t]`: clients without an update in t."""
    federation = federation_for(clients)
    for t in range(1, federation.fed.rounds + 1):
        plan = federation.plan_round()
        plan.fails = [i in (absent or {}).get(t, ()) for i in plan.participants]
        federation.run_round(t, plan)
    return global_factors(federation.server.model)


def flower_run(tmp_path, faults: list[str], timeout_s: float) -> dict:
    """The app on a local deployment, one SuperNode per fault drill ("" for none)."""
    federation_for(len(faults))  # pretrains the tiny base into the cache the nodes share
    with LocalDeployment(tmp_path, faults) as deployment:
        deployment.run({"fslora-args": f"{ARGS} --clients {len(faults)}",
                        "out-dir": str(tmp_path), "timeout": timeout_s}, timeout=500)
    assert all(p.poll() is not None for p in deployment.processes)  # every process stopped
    return torch.load(tmp_path / RESULT_NAME, weights_only=True)


def assert_same_factors(result: dict, expected: dict) -> None:
    assert {k.rsplit("/", 1)[0] for k in result["factors"]} == set(expected)
    for name, (B, A) in expected.items():
        for got, ref in ((result["factors"][f"{name}/B"], B), (result["factors"][f"{name}/A"], A)):
            assert ((got - ref).norm() / ref.norm()).item() < TOL, name


# the methods' downlinks differ: r / k (None), one weight for all (HetLoRA's 1.0), one weight
# per index (the importance sketch), SVD factors of the global product (FlexLoRA)
@pytest.mark.parametrize("method", ["fslora", "hetlora", "fslora-importance", "flexlora"])
def test_codec_round_trips_downlinks_and_updates(method):
    federation = federation_for(2, method)
    plan = federation.plan_round()
    for i, down in zip(plan.participants, plan.downlinks):
        client, back = decode_downlink(encode_downlink(down, i, federation.server.rank))
        assert client == i and list(back) == list(down)
        for name, f in down.items():
            assert torch.equal(back[name].b, f.b) and torch.equal(back[name].a, f.a)
            assert torch.equal(back[name].sketch.indices, f.sketch.indices)
            if f.sketch.per_index is None:
                assert back[name].sketch.sketch_weight == f.sketch.sketch_weight
            else:
                assert torch.equal(back[name].sketch.per_index, f.sketch.per_index)
    i = plan.participants[0]
    update, = train_clients("sequential", federation.server.model, [i], plan.downlinks[:1],
                            [federation.batch_streams[i]], federation.client_cfg,
                            [len(federation.data.clients[i].train)])
    back = decode_update(encode_update(update), plan.downlinks[0])
    assert (back.client_id, back.num_examples, back.trainable_parameters) == (
        update.client_id, update.num_examples, update.trainable_parameters)
    for name, (db, da) in update.deltas.items():
        assert torch.equal(back.deltas[name][0], db) and torch.equal(back.deltas[name][1], da)
        assert torch.equal(back.sketches[name].indices, update.sketches[name].indices)
    fewer = dict(list(plan.downlinks[0].items())[1:])  # a reply for a module never sent
    with pytest.raises(KeyError, match="not sent"):
        decode_update(encode_update(update), fewer)


def test_flora_and_simulated_dropout_are_refused_by_name():
    for method in UNSUPPORTED_METHODS:  # FLoRA, and the methods whose messages these lack
        with pytest.raises(ValueError, match=f"'{method}' is not supported on Flower"):
            experiment_config({"fslora-args": f"--method {method}"})
    with pytest.raises(ValueError, match="--dropout 0.2"):
        experiment_config({"fslora-args": "--dropout 0.2"})
    with pytest.raises(ValueError, match="fslora-args"):
        experiment_config({})


@pytest.mark.parametrize("flags, needle", [
    ("--rank 0", "fslora-args '--rank 0': argument --rank: must be a positive integer, got 0"),
    ("--bogus", "fslora-args '--bogus': unrecognized arguments: --bogus"),
    ("--rank 'x", "No closing quotation"),
    ("--help", "--help is not a run flag"),
    ("--method flora", "'flora' is not supported on Flower"),
])
def test_the_launcher_refuses_bad_fslora_args_with_one_error_line(flags, needle, capsys,
                                                                   tmp_path):
    with pytest.raises(SystemExit) as exc:  # before any process starts or folder is made
        launch([f"--fslora-args={flags}", "--work", str(tmp_path / "work")])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert needle in err.splitlines()[-1] and "Traceback" not in err and not out
    assert not (tmp_path / "work").exists()


# One deployment serves both slow tests (its start and stop cost about 30 s): five SuperNodes,
# clients 0 and 1 (k_i = 2 and 4) reply in both rounds; in round 2 client 2's ClientApp process
# dies (no reply), client 3 replies with NaN deltas (screened out), client 4 with a record that
# is no update (unreadable). The server waits out its timeout for the dead client.
DRILLS = ["", "", "die@2", "nan@2", "junk@2"]
SILENT = {2: {2, 3, 4}}  # round -> the clients without an update in it


@pytest.fixture(scope="module")
def drilled_run(tmp_path_factory) -> dict:
    return flower_run(tmp_path_factory.mktemp("flower"), DRILLS, timeout_s=25)


@pytest.mark.slow
def test_flower_messages_carry_the_accounted_bytes(drilled_run):
    assert [r["round"] for r in drilled_run["records"]] == [1, 2]
    replied = 0
    for wire in drilled_run["wire"]:
        assert len(wire["participants"]) == len(DRILLS)
        for w, down, up in zip(wire["participants"], wire["accounted_down_bytes"],
                               wire["accounted_up_bytes"]):
            assert w["down_payload_bytes"] == down > 0
            # the measured messages: the payload plus a small overhead (packed arrays, index
            # sets, names, Flower's object ids), not one frame per module field
            assert down < w["down_bytes"] < down + 4096
            if w["client"] not in SILENT.get(wire["round"], ()):  # an update that counted
                assert w["up_payload_bytes"] == up and up < w["up_bytes"] < up + 4096
                replied += 1
    assert replied == 2 * len(DRILLS) - len(SILENT[2])


@pytest.mark.slow
def test_a_dead_client_and_bad_replies_leave_what_the_good_replies_give(drilled_run):
    first, last = drilled_run["records"]
    assert first["dropped"] == first["rejected"] == []
    assert last["dropped"] == [2] and last["rejected"] == [3, 4]
    assert "non-finite" in last["reasons"][0] and "malformed reply" in last["reasons"][1]
    assert_same_factors(drilled_run, in_process(len(DRILLS), absent=SILENT))
