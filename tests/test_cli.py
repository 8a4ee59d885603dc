"""The CLI: bad values exit with an error that names them and their flag (before any training),
--help is generated from the config knobs, and messages never give unsafe advice."""

import dataclasses
import hashlib
import io
import json
import pickle
import re
import shlex
import time
from pathlib import Path

import pytest
import torch

import fslora_min.federation as federation_module
from fslora_min.checkpoint import CHECKPOINT_NAME, MAGIC, CheckpointError, read_payload
from fslora_min.cli import PARTS, build_parser, main
from fslora_min.study.cli import build_parser as compare_parser
from fslora_min.study.cli import compare_configs_from_args, main as compare
from fslora_min.study.config import CompareConfig, quick_config
from fslora_min.experiment import preset
from fslora_min.outputs import RUN_FILES
from fslora_min.federation import Federation
from fslora_min.knobs import ConfigError, flag_of, knobs
from fslora_min.registry import METHODS
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
    (["--resume", "--overwrite"], "--overwrite replaces it: give one of them"),
    (["--rank", "129"], "--rank 129 exceeds min(m, n) = 128 of the adapted module "
                        "blocks.0.attn.q (128 x 128)"),
    (["--rank", "17", "--preset", "tiny"], "min(m, n) = 16 of the adapted module"),
    (["--rank-distribution", "normal", "--ratios", "0.5"],
     "argument --ratios: cannot be given with --rank-distribution normal: both set the client "
     "ranks k_i"),
    (["--lora-backend", "cuda"], "invalid choice: 'cuda'"),
    (["--lora-gemm", "fast"], "invalid choice: 'fast'"),
    (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
    # options that do not apply
    (["--lora-gemm", "tma", "--lora-backend", "torch"],
     "argument --lora-gemm: 'tma' picks the Triton kernels' base GEMM, and --lora-backend torch "
     "on cpu runs PyTorch's matmul"),
    (["--lora-gemm", "merged"], "--lora-backend auto on cpu runs PyTorch's matmul"),
    (["--ratios", *["0.5"] * 12, "--clients", "2"],
     "argument --ratios: 12 given for 2 clients (--clients); give at most 2"),
    (["--preset", "tiny", "--batch-size", "100000"],
     "argument --batch-size: 100000 exceeds every client's training sequences (at most 12)"),
    (["--clients", "1000000"], "argument --clients: at most 1000, got 1000000"),
    (["--rounds", str(10**12)], "argument --rounds: at most 100000, got 1000000000000"),
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
    (["--rounds", "ten"], "argument --rounds: invalid int value: 'ten'"),
    (["--rounds", "50"], "argument --rounds: must be at least the middle horizon, 100, got 50"),
    (["--quick", "--rounds", "1"], "argument --rounds: must be at least the middle horizon, 2"),
    (["--lr-grid", "0.1", "-1"], "argument --lr-grid: must be positive and finite, got -1.0"),
    (["--server-lr-grid", "nan"], "argument --server-lr-grid: must be positive and finite"),
    (["--task", "mars"], "argument --task: invalid choice: 'mars'"),
    (["--tables", "everything"], "argument --tables: invalid choice: 'everything'"),
    (["--methods", "magic"], "argument --methods: invalid choice: 'magic'"),
    (["--methods", "hetlora"], "argument --methods: must include fslora, got ('hetlora',)"),
    (["--out"], "argument --out: expected one argument"),
])
def test_bad_compare_arguments_exit_with_an_error_naming_the_flag(args, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        compare(["--out", str(tmp_path / "cmp"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m fslora_min compare ") and needle in err
    assert not (tmp_path / "cmp").exists()


def test_compare_help_explains_every_knob_with_its_default_once(capsys):
    with pytest.raises(SystemExit):
        compare(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone
    cfg, quick = CompareConfig(), quick_config()
    for f in knobs(CompareConfig):
        help_start = " ".join(f.metadata["help"].split()[:4])
        assert f"{flag_of(f)} " in text and help_start in text, (f.name, help_start)
    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text)
    assert f"the long horizon T of the decisive tables (default: {cfg.horizons[2]})" in text
    assert f"(default: {' '.join(cfg.methods)})" in text and "(default: 0.03 0.1 0.3 1)" in text
    assert f"(default: {cfg.out_dir})" in text and "(default: all of the task's)" in text
    assert (f"{quick.num_clients} clients, {len(quick.seeds)} + {len(quick.tune_seeds)} seeds, one "
            f"grid point, {quick.horizons[2]} rounds, and the linear task's study in miniature "
            f"(OUT/linear/); --out defaults to {quick.out_dir}") in text
    for flag in ("--quick", "--no-train", "--readme"):
        assert f"{flag} " in text


@pytest.mark.parametrize("argv,want", [
    ([], [CompareConfig()]),
    (["--quick"], [quick_config(task_name=t) for t in ("synthetic", "planted", "shakespeare")]),
    (["--rounds", "400"], [CompareConfig(horizons=(30, 100, 400))]),
    (["--quick", "--rounds", "5", "--task", "planted"],
     [dataclasses.replace(quick_config(task_name="planted"), horizons=(1, 2, 5))]),
    (["--tables", "main", "adamw", "--methods", "fslora", "flora", "--lr-grid", "0.5",
      "--server-lr-grid", "1", "2", "--out", "elsewhere"],
     [CompareConfig(tables=("main", "adamw"), methods=("fslora", "flora"), lr_grid=(0.5,),
                    server_lr_grid=(1.0, 2.0), out_dir="elsewhere")]),
])
def test_compare_flags_set_their_fields_and_rounds_only_the_long_horizon(argv, want):
    cfgs = compare_configs_from_args(compare_parser().parse_args(argv))
    assert len(cfgs) == len(want)
    for cfg, w in zip(cfgs, want):
        for f in dataclasses.fields(CompareConfig):
            if f.name != "rounds":  # the flag, folded into horizons
                assert getattr(cfg, f.name) == getattr(w, f.name), f.name
        assert cfg.tables == w.tables and isinstance(cfg.lr_grid, tuple)


def test_an_empty_tuple_knob_is_refused_unless_it_is_the_default():
    assert CompareConfig(tables=()).table_names == CompareConfig().table_names
    for name in ("methods", "lr_grid", "server_lr_grid"):
        with pytest.raises(ConfigError, match=f"{name}: must not be empty"):
            CompareConfig(**{name: ()})


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
    assert ("(default: 300 with --preset default, 150 with --preset tiny, 600 with --preset "
            "default --task shakespeare, 100 with --preset tiny --task shakespeare, 300 with "
            "--preset default --task planted, 150 with --preset tiny --task planted)") in text
    assert "0.05 with --preset default --task shakespeare" in text  # --lr: a preset's step


def test_help_says_what_local_steps_and_the_tiny_preset_are(capsys):
    text = run_help(capsys)
    steps = text[text.index("--local-steps LOCAL_STEPS"):].split(" --lr ")[0]
    assert "local optimizer steps each participant takes per round" in steps
    model, data, pretrain = preset("tiny")[:3]
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
    model, data, pretrain = preset("tiny")[:3]
    _, path = load_or_pretrain(model, data, pretrain, cache_dir=tmp_path, progress=False)
    for content in (b"not a torch file", pickle.dumps(print, protocol=2)):
        path.write_bytes(content)
        load_or_pretrain(model, data, pretrain, cache_dir=tmp_path, progress=False)
        err = capsys.readouterr().err
        assert f"{path} is not an fslora-min base-model cache" in err
        assert "pretraining the base model again" in err
        assert "False" not in err and "trust" not in err
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


TINY = ["run", "--preset", "tiny", "--clients", "2", "--rank", "4", "--rounds", "2",
        "--local-steps", "2", "--batch-size", "4", "--no-progress"]


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """A pretraining cache shared by this module's tiny runs."""
    monkeypatch.setenv("FSLORA_CACHE", str(tmp_path_factory.getbasetemp() / "cli-cache"))


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(name, capsys, tmp_path):
    (tmp_path / name).write_text("an earlier run")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(tmp_path), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"already holds a run ({name})" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / name).read_text() == "an earlier run"


def test_overwrite_replaces_the_run_and_its_stale_checkpoint(capsys, tmp_path, cache):
    for name in RUN_FILES:
        (tmp_path / name).write_text("an earlier run")
    assert main([*TINY, "--out", str(tmp_path), "--overwrite"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["federation"]["rounds"] == 2
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # it was another run's


@pytest.mark.parametrize("args", [["--rank", "17"], ["--resume"], ["--rounds", "0"],
                                  ["--batch-size", "13"], ["--lora-gemm", "tma"]])
def test_a_failed_invocation_leaves_no_folder_behind(args, capsys, tmp_path, cache):
    with pytest.raises(SystemExit):  # --rank 17 fails after the folder was made: it is removed
        main([*TINY, "--out", str(tmp_path / "new" / "run"), *args])
    assert capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_run_that_applied_no_update_says_so_and_exits_non_zero(capsys, tmp_path, cache,
                                                                  monkeypatch):
    monkeypatch.setattr(federation_module, "screen_updates",
                        lambda updates, clients, *_: ([], [(c, "test refusal") for c in clients]))
    assert main([*TINY, "--out", str(tmp_path)]) == 1
    assert ("no update was applied in 2 rounds: 4 of 4 uploads were rejected (the first: "
            "client 0, test refusal) and 0 participants dropped out, so the global model is the "
            "initial one") in capsys.readouterr().err
    assert (tmp_path / "metrics.json").exists()  # the record of what went wrong


def test_ctrl_c_prints_one_line_and_the_printed_command_resumes(capsys, tmp_path, cache,
                                                                monkeypatch):
    """Exit 130 with the last checkpointed round and the command to resume; the resumed run
    says where it starts, and its wall time adds the interrupted part's."""
    play = Federation.run_round

    def slow_then_ctrl_c(self, t):
        if t == 3:
            raise KeyboardInterrupt
        time.sleep(0.5)  # the interrupted part's wall time, which the resumed run must count
        return play(self, t)

    args = [*TINY, "--rounds", "4", "--checkpoint-every", "2", "--out", str(tmp_path / "r un")]
    with monkeypatch.context() as mp:
        mp.setattr(Federation, "run_round", slow_then_ctrl_c)
        assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "round 2 is checkpointed in" in err, err
    command = shlex.split(err.split("resume with: ")[1])
    assert command[:3] == ["python", "-m", "fslora_min"] and command[-1] == "--resume"
    before = read_payload(tmp_path / "r un" / CHECKPOINT_NAME)["federation"]["wall_seconds"]
    assert before >= 1.0
    assert main(command[3:]) == 0
    assert "resuming from round 2 of 4" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "r un" / "metrics.json").read_text())
    resumed_part = sum(r["seconds"] for r in metrics["history"]["rounds"][2:])
    assert metrics["info"]["wall_seconds"] >= before + resumed_part


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(capsys, tmp_path, cache,
                                                                      monkeypatch):
    def ctrl_c(self, t):
        raise KeyboardInterrupt

    monkeypatch.setattr(Federation, "run_round", ctrl_c)
    assert main([*TINY, "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted before any checkpoint was written (--checkpoint-every N saves one every N "
        "rounds): nothing to resume")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["run", "compare"])
def test_an_unwritable_base_model_cache_is_an_error_naming_fslora_cache(capsys, tmp_path,
                                                                       monkeypatch, command):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("FSLORA_CACHE", str(tmp_path / "a-file" / "cache"))
    argv = ([*TINY, "--out", str(tmp_path / "run")] if command == "run" else
            ["--quick", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exc:
        (main if command == "run" else compare)(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write the base-model cache in" in err and "set FSLORA_CACHE to a" in err
    assert not (tmp_path / "run").exists()


def test_resume_on_a_finished_run_is_refused_and_leaves_it_alone(capsys, tmp_path, cache):
    args = [*TINY, "--checkpoint-every", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as exc:
        main([*args, "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: --resume: the run in {str(tmp_path)!r} has finished its 2 rounds: "
                        f"nothing to resume (--overwrite runs it again)"), err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_readme_lists_every_method():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = re.search(r"run --method \{([^}]*)\}", readme).group(1)
    assert [m.strip() for m in listed.split(",")] == list(METHODS)
