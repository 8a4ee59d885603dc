"""The CLI: bad values exit with an error that names them (before any training), and a tiny run
writes its metrics and figure."""

import json

import pytest

from fslora_min.cli import main


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "rank must be a positive integer, got 0"),
    (["--rank", "-4"], "got -4"),
    (["--ratios", "0"], "ratio must be in (0, 1], got 0.0"),
    (["--ratios", "0.5", "1.5"], "got 1.5"),
    (["--ratios", "1/64", "--rank", "16"], "k=0"),
    (["--ratios", "half"], "not a ratio: 'half'"),
    (["--clients", "4", "--participants", "5"], "participants=5"),
    (["--lr", "nan"], "got nan"),
    (["--lr", "-0.1"], "got -0.1"),
    (["--global-lr", "inf"], "got inf"),
    (["--rounds", "0"], "rounds must be a positive integer, got 0"),
    (["--local-steps", "0"], "got 0"),
    (["--dirichlet-alpha", "0"], "dirichlet_alpha"),
    (["--device", "tpu"], "'tpu'"),
    (["--method", "magic"], "'magic'"),
])
def test_bad_arguments_exit_with_an_error_naming_the_value(args, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(tmp_path), "--no-progress", *args])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_explains_every_knob(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--method", "--rank", "--ratios", "--rank-distribution", "--clients",
                 "--participants", "--rounds", "--local-steps", "--lr", "--client-optimizer",
                 "--server-optimizer", "--global-lr", "--dirichlet-alpha", "--seed", "--device",
                 "--out"):
        assert flag in text
