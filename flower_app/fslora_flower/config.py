"""The one configuration a Flower run shares between its ServerApp and every ClientApp.

The run config carries `fslora-args`: the very flags of `python -m fslora_min run` (for
example "--preset tiny --clients 2 --rounds 2"), parsed by that CLI's own parser and checks.
Server and clients build the same federation from them (`build_federation`: the base model,
the task's data, the method), so a client holds the base W0 and its own data shard, and
the server its global factors; what a client trains comes only in its messages.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex

from flwr.app import UserConfig

from fslora_min.cli import build_parser, config_from_args, under_flag
from fslora_min.experiment import ExperimentConfig, build_federation
from fslora_min.federation import Federation
from fslora_min.knobs import ConfigError

UNSUPPORTED_METHODS = {"flora": "FLoRA merges into every client's W0 each round, which these "
                                "messages do not carry",
                       "fedex-lora": "FedEx-LoRA folds a residual into every client's W0 each "
                                     "round, which these messages do not carry",
                       "fed-plora": "these messages carry no folded ranks",
                       "flasc": "the ClientApp sends its deltas dense, not FLASC's top-k",
                       "ffa-lora": "these messages do not say which factor is frozen",
                       "rolora": "these messages do not say which factor is frozen"}


def parse_run_flags(text: str) -> argparse.Namespace:
    """`python -m fslora_min run` flags -> its parsed arguments; a ValueError (not argparse's
    usage and exit) names what is wrong, for the launcher and the apps to report."""
    messages = io.StringIO()
    try:
        flags = shlex.split(text)  # ValueError for an unclosed quotation
        with contextlib.redirect_stderr(messages), contextlib.redirect_stdout(messages):
            return build_parser().parse_args(["run", *flags])
    except SystemExit as exit:  # argparse printed its usage and an error, or the help
        said = (messages.getvalue().strip().rsplit("error: ", 1)[-1] if exit.code else
                "--help is not a run flag: see python -m fslora_min run --help")
        raise ValueError(said) from None


def experiment_config(run_config: UserConfig) -> ExperimentConfig:
    """The ExperimentConfig of `fslora-args`; a ValueError names a bad or unsupported value."""
    text = run_config.get("fslora-args")
    if not isinstance(text, str):
        raise ValueError(f"the run config needs fslora-args, a string of `python -m fslora_min "
                         f"run` flags, got {text!r}")
    try:
        args = parse_run_flags(text)
        cfg = config_from_args(args)
    except ConfigError as err:
        raise ValueError(f"fslora-args {text!r}: {under_flag(args, err)}") from None
    except ValueError as err:
        raise ValueError(f"fslora-args {text!r}: {err}") from None
    if cfg.method in UNSUPPORTED_METHODS:
        raise ValueError(f"method {cfg.method!r} is not supported on Flower: "
                         f"{UNSUPPORTED_METHODS[cfg.method]}")
    if cfg.federation.dropout:
        raise ValueError(f"--dropout {cfg.federation.dropout} simulates failures; on Flower "
                         f"failures are real: leave it at 0")
    return cfg


def federation_of(run_config: UserConfig) -> tuple[ExperimentConfig, Federation, dict]:
    cfg = experiment_config(run_config)
    federation, info = build_federation(cfg, progress=False)
    return cfg, federation, info
