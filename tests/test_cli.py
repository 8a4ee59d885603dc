"""The CLI: bad values exit with an error that names them (before any training), and a tiny run
writes its metrics and figure."""

import pytest

from fslora_min.cli import main


BAD_RUN_ARGUMENTS = [
    (["--rank", "0"], "rank must be a positive integer, got 0"),
    (["--rank", "-4"], "got -4"),
    (["--rank", "four"], "argument --rank: invalid int value: 'four'"),
    (["--rank", "2.5"], "invalid int value: '2.5'"),
    (["--ratios", "0"], "ratio must be in (0, 1], got 0.0"),
    (["--ratios", "0.5", "1.5"], "got 1.5"),
    (["--ratios", "1/64", "--rank", "16"], "k=0"),
    (["--ratios", "half"], "not a ratio: 'half'"),
    (["--ratios", "1/0"], "not a ratio: '1/0'"),
    (["--rank-distribution", "zipf"], "invalid choice: 'zipf'"),
    (["--lora-alpha", "0"], "lora_alpha must be positive and finite, got 0.0"),
    (["--lora-alpha", "x"], "invalid float value: 'x'"),
    (["--targets", "embed"], "invalid choice: 'embed'"),
    (["--clients", "0"], "num_clients must be a positive integer, got 0"),
    (["--clients", "4", "--participants", "5"], "participants=5"),
    (["--participants", "0"], "participants must be a positive integer, got 0"),
    (["--eval-every", "0"], "eval_every must be a positive integer, got 0"),
    (["--dropout", "1"], "dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "got -0.1"),
    (["--dropout", "nan"], "dropout must be in [0, 1), got nan"),
    (["--clients-per-pass", "-2"], "clients_per_pass must be a non-negative integer"),
    (["--lr", "nan"], "got nan"),
    (["--lr", "-0.1"], "got -0.1"),
    (["--global-lr", "inf"], "got inf"),
    (["--rounds", "0"], "rounds must be a positive integer, got 0"),
    (["--local-steps", "0"], "got 0"),
    (["--batch-size", "0"], "batch size must be a positive integer, got 0"),
    (["--client-optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--server-optimizer", "lion"], "invalid choice: 'lion'"),
    (["--aggregation", "median"], "invalid choice: 'median'"),
    (["--dirichlet-alpha", "0"], "dirichlet_alpha"),
    (["--pretrain-steps", "0"], "pretrain steps must be positive, got 0"),
    (["--seed", "-1"], "seed must be a non-negative integer, got -1"),
    (["--seed", "one"], "invalid int value: 'one'"),
    (["--device", "tpu"], "'tpu'"),
    (["--method", "magic"], "'magic'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be a non-negative integer, got -1"),
    (["--out"], "argument --out: expected one argument"),
    (["--out", " "], "the output folder must be a non-empty path"),
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
