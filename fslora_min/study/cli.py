"""The reproduction study: every row tuned, every claim over seeds and horizons, with verdicts
(fslora_min/study/). Its flags are the knobs of CompareConfig (fslora_min/study/config.py),
generated as `run`'s are (fslora_min/cli.py); the mode flags choose what it does with them."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from fslora_min.cli import add_knobs, given_knobs, under_flag
from fslora_min.outputs import output_folder
from fslora_min.study.compare import run_compare
from fslora_min.study.config import STUDY_TASKS, CompareConfig, quick_config
from fslora_min.study.linear_study import write_study
from fslora_min.study.readme import update_readmes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fslora_min compare", description=__doc__)
    q = quick_config()
    flags = add_knobs(parser, (("study", "compare", CompareConfig),))
    g = parser.add_argument_group("mode")
    g.add_argument("--quick", action="store_true",
                   help=f"every task in miniature (the tests run it; --task: that one only): "
                        f"each task's first table with {q.num_clients} clients, {len(q.seeds)} + "
                        f"{len(q.tune_seeds)} seeds, one grid point, {q.horizons[2]} rounds, and "
                        f"the linear task's study in miniature (OUT/linear/); --out defaults "
                        f"to {q.out_dir}")
    g.add_argument("--no-train", action="store_true",
                   help="write the tables from cached runs only, marking what is missing")
    g.add_argument("--readme", action="store_true",
                   help="only rewrite the study's blocks in results/compare/README.md and "
                        "README.md from the committed runs (no training; other flags ignored)")
    parser.set_defaults(command_parser=parser, flags=flags)
    return parser


def compare_configs_from_args(args: argparse.Namespace) -> list[CompareConfig]:
    """Turn parsed `compare` arguments into the CompareConfigs to run: the flags given over the
    study's defaults (or --quick's: one per task unless --task names one), which checks them;
    raises a ConfigError naming a bad value's field."""
    given = {name: tuple(value) if isinstance(value, list) else value
             for name, value in given_knobs(args, "compare").items()}
    if not args.quick:
        return [replace(CompareConfig(), **given)]
    tasks = [given["task"]] if "task" in given else list(STUDY_TASKS)
    return [replace(quick_config(task_name=t), **given) for t in tasks]


def main(argv: list[str]) -> int:
    """`compare`'s arguments (the words after `compare`) -> the study run or replayed."""
    args = build_parser().parse_args(argv)
    if args.readme:
        update_readmes()
        return 0
    try:
        cfgs = compare_configs_from_args(args)
        with output_folder(cfgs[0].out_dir):  # checked writable; removed if nothing was written
            for cfg in cfgs:
                run_compare(cfg, train=not args.no_train)
            if args.quick and "task" not in given_knobs(args, "compare"):
                write_study(Path(cfgs[0].out_dir) / "linear", quick=True)
    except ValueError as err:  # a bad value, an unwritable --out or base-model cache
        args.command_parser.error(under_flag(args, err))
    return 0
