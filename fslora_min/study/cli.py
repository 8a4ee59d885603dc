"""The reproduction study: every row tuned, every claim over seeds and horizons, with verdicts
(fslora_min/study/). Its flags are the knobs of CompareConfig (fslora_min/study/config.py),
generated as `run`'s are (fslora_min/cli.py); the mode flags choose what it does with them."""

from __future__ import annotations

import argparse
from dataclasses import replace

from fslora_min.cli import add_knobs, given_knobs, under_flag
from fslora_min.outputs import output_folder
from fslora_min.study.compare import run_compare
from fslora_min.study.config import CompareConfig, quick_config
from fslora_min.study.readme import update_readmes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fslora_min compare", description=__doc__)
    q = quick_config()
    flags = add_knobs(parser, (("study", "compare", CompareConfig),))
    g = parser.add_argument_group("mode")
    g.add_argument("--quick", action="store_true",
                   help=f"the main table in miniature (the tests run it): {q.num_clients} "
                        f"clients, {len(q.seeds)} + {len(q.tune_seeds)} seeds, one grid point, "
                        f"{q.horizons[2]} rounds; --out defaults to {q.out_dir}")
    g.add_argument("--no-train", action="store_true",
                   help="write the tables from cached runs only, marking what is missing")
    g.add_argument("--readme", action="store_true",
                   help="only rewrite the study's blocks in results/compare/README.md and "
                        "README.md from the committed runs (no training; other flags ignored)")
    parser.set_defaults(command_parser=parser, flags=flags)
    return parser


def compare_config_from_args(args: argparse.Namespace) -> CompareConfig:
    """Turn parsed `compare` arguments into a CompareConfig: the flags given over the study's
    defaults (or --quick's), which checks them; raises a ConfigError naming a bad value's field."""
    given = {name: tuple(value) if isinstance(value, list) else value
             for name, value in given_knobs(args, "compare").items()}
    base = quick_config(task_name=given.get("task", "synthetic")) if args.quick else CompareConfig()
    return replace(base, **given)


def main(argv: list[str]) -> int:
    """`compare`'s arguments (the words after `compare`) -> the study run or replayed."""
    args = build_parser().parse_args(argv)
    if args.readme:
        update_readmes()
        return 0
    try:
        cfg = compare_config_from_args(args)
        with output_folder(cfg.out_dir):  # checked writable; removed if nothing was written
            run_compare(cfg, train=not args.no_train)
    except ValueError as err:  # a bad value, an unwritable --out or base-model cache
        args.command_parser.error(under_flag(args, err))
    return 0
