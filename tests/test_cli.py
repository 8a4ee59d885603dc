"""The CLI: bad values exit with an error that names them and their flag (before any training),
--help is generated from the config knobs, and messages never give unsafe advice."""

import hashlib
import io
import pickle
import re

import pytest
import torch

from fslora_min.checkpoint import MAGIC, CheckpointError, read_payload
from fslora_min.cli import PARTS, main
from fslora_min.experiment import preset
from fslora_min.knobs import flag_of, knobs
from fslora_min.pretrain import load_or_pretrain


BAD_RUN_ARGUMENTS = [
    (["--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["--rank", "-4"], "got -4"),
    (["--rank", "four"], "argument --rank: invalid int value: 'four'"),
    (["--rank", "2.5"], "invalid int value: '2.5'"),
    (["--ratios", "0"], "ratio must be in (0, 1], got 0.0"),
    (["--ratios", "0.5", "1.5"], "got 1.5"),
    (["--ratios", "1/64", "--rank", "16"], "k=0"),
    (["--ratios", "half"], "not a ratio: 'half'"),
    (["--ratios", "1/0"], "not a ratio: '1/0'"),
    (["--rank-distribution", "zipf"], "invalid choice: 'zipf'"),
    (["--lora-alpha", "0"], "argument --lora-alpha: must be positive and finite, got 0.0"),
    (["--lora-alpha", "x"], "invalid float value: 'x'"),
    (["--targets", "embed"], "invalid choice: 'embed'"),
    (["--clients", "0"], "argument --clients: must be a positive integer, got 0"),
    (["--clients", "4", "--participants", "5"],
     "argument --participants: must be at most the number of clients, 4, got 5"),
    (["--participants", "0"], "argument --participants: must be a positive integer, got 0"),
    (["--eval-every", "0"], "argument --eval-every: must be a positive integer, got 0"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "got -0.1"),
    (["--dropout", "nan"], "argument --dropout: must be in [0, 1), got nan"),
    (["--clients-per-pass", "-2"], "argument --clients-per-pass: must be a non-negative integer"),
    (["--lr", "nan"], "got nan"),
    (["--lr", "-0.1"], "got -0.1"),
    (["--global-lr", "inf"], "got inf"),
    (["--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    (["--local-steps", "0"], "argument --local-steps: must be a positive integer, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--client-optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--server-optimizer", "lion"], "invalid choice: 'lion'"),
    (["--aggregation", "median"], "invalid choice: 'median'"),
    (["--dirichlet-alpha", "0"], "argument --dirichlet-alpha: must be positive and finite"),
    (["--pretrain-steps", "0"], "argument --pretrain-steps: must be a positive integer, got 0"),
    (["--seed", "-1"], "argument --seed: must be a non-negative integer, got -1"),
    (["--seed", "one"], "invalid int value: 'one'"),
    (["--device", "tpu"], "'tpu'"),
    (["--method", "magic"], "'magic'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--checkpoint-every", "-1"],
     "argument --checkpoint-every: must be a non-negative integer, got -1"),
    (["--out"], "argument --out: expected one argument"),
    (["--out", " "], "argument --out: must be a non-empty path"),
    (["--out", "{tmp}/a-file/sub"], "is not writable"),
    (["--resume"], "no checkpoint to resume from in"),
    (["--lora-backend", "cuda"], "invalid choice: 'cuda'"),
    (["--lora-gemm", "fast"], "invalid choice: 'fast'"),
    (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
]


@pytest.mark.parametrize("args,needle", BAD_RUN_ARGUMENTS)
def test_bad_arguments_exit_with_an_error_naming_the_value(args, needle, capsys, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(tmp_path), "--no-progress", *args])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--rounds", "0"], "argument --rounds: must be a positive integer, got 0"),
    (["--rounds", "ten"], "not an integer: 'ten'"),
    (["--lr-grid", "0.1", "-1"], "must be positive and finite, got -1.0"),
    (["--task", "mars"], "invalid choice: 'mars'"),
    (["--tables", "everything"], "invalid choice: 'everything'"),
])
def test_bad_compare_arguments_exit_with_an_error(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *args])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_explains_every_knob(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--rank", "--ratios", "--rank-distribution", "--clients",
                 "--participants", "--rounds", "--local-steps", "--lr", "--client-optimizer",
                 "--server-optimizer", "--global-lr", "--dirichlet-alpha", "--seed", "--device",
                 "--out", "--preset", "--dropout", "--checkpoint-every", "--resume",
                 "--clients-per-pass", "--lora-backend", "--lora-gemm"):
        assert flag in text


def test_forced_triton_on_a_cpu_without_the_interpreter_exits_before_training(
        capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("kernels.dispatch.INTERPRET", False)
    monkeypatch.setattr("fslora_min.experiment.load_or_pretrain",
                        lambda *a, **k: pytest.fail("pretraining started"))
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(tmp_path), "--no-progress", "--device", "cpu",
              "--lora-backend", "triton"])
    assert exc.value.code == 2
    assert "backend='triton' on device 'cpu' needs CUDA" in capsys.readouterr().err


def run_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def test_help_is_generated_from_every_knob_with_its_default_once(capsys):
    text = run_help(capsys)
    for _, attr, cls in PARTS:
        for f in knobs(cls):
            help_start = " ".join(f.metadata["help"].split()[:4])
            assert f"{flag_of(f)} " in text and help_start in text, (f.name, help_start)
    # one default per knob: never "(default: all N) (default: None)"
    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text)
    assert "(default: all N)" in text and "(default: 10)" in text  # --participants, --clients
    assert "(default: 300 with --preset default, 150 with --preset tiny)" in text


def test_help_says_what_local_steps_and_the_tiny_preset_are(capsys):
    text = run_help(capsys)
    steps = text[text.index("--local-steps LOCAL_STEPS"):].split(" --lr ")[0]
    assert "local optimizer steps each participant takes per round" in steps
    model, data, pretrain = preset("tiny")
    assert (f"tiny: {model.n_layer} block of width {model.d_model}, a {data.vocab_size}-token "
            f"vocabulary, {data.train_seqs} training sequences of {data.seq_len} tokens per "
            f"client, {pretrain.steps} pretraining steps") in text


@pytest.mark.parametrize("argv", [["run", "--clients", "0"], ["--clients", "0"]])
def test_a_bad_value_names_the_flag_under_the_run_usage(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])  # run's flags alone mean `run`
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: python -m fslora_min run ")
    assert "error: argument --clients: must be a positive integer, got 0" in err
    assert "num_clients" not in err


def test_an_unreadable_base_model_cache_is_rebuilt_without_unsafe_advice(capsys, tmp_path):
    model, data, pretrain = preset("tiny")
    _, path = load_or_pretrain(model, data, pretrain, cache_dir=tmp_path, progress=False)
    for content in (b"not a torch file", pickle.dumps(print, protocol=2)):
        path.write_bytes(content)
        load_or_pretrain(model, data, pretrain, cache_dir=tmp_path, progress=False)
        out = capsys.readouterr().out
        assert f"cached base model {path} is unreadable" in out and "pretraining again" in out
        assert "weights_only" not in out and "False" not in out and "trust" not in out
    buffer = io.BytesIO()
    torch.save({"version": 1, "config": {}, "federation": Unpicklable()}, buffer)
    payload = buffer.getvalue()  # a checkpoint whose header is right and whose payload runs code
    (tmp_path / "c.pt").write_bytes(MAGIC + len(payload).to_bytes(8, "big")
                                    + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError) as err:
        read_payload(tmp_path / "c.pt")
    assert "refused to unpickle it" in str(err.value) and "False" not in str(err.value)


class Unpicklable:
    def __reduce__(self):
        return (print, ("this ran",))
