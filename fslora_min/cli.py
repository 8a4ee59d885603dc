"""Command line: `python -m fslora_min` runs the demo; `python -m fslora_min run --help` lists
every knob. (`python -m fslora_min compare`, the study, is fslora_min/study/cli.py.)

`run`'s flags are generated from the config dataclasses' knobs
(fslora_min/knobs.py): each knob is written once, as a field with its type, default, help and
check. Every value is checked by its config, whose error names the field; it is reported here
under its flag. The output folder and the checkpoint to resume from are checked too, all before
any training."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import replace
from typing import Callable, get_args, get_origin, get_type_hints

from fslora_min.client import ClientConfig
from fslora_min.compute import ComputeConfig
from fslora_min.data import DataConfig
from fslora_min.experiment import (PRESETS, ExperimentConfig, Interrupted, Preset, preset,
                                   run_experiment, write_outputs)
from fslora_min.federation import FederationConfig
from fslora_min.knobs import ConfigError, flag_of, knobs
from fslora_min.lora import LoRAConfig
from fslora_min.outputs import output_folder
from fslora_min.pretrain import PretrainConfig
from fslora_min.server import ServerConfig
from fslora_min.stopping import exit_status, sigterm_as_ctrl_c
from fslora_min.tasks import TASKS


# The parts of an ExperimentConfig that `run` sets, in --help's order: (title, attribute, class).
# Every knob of these classes (fslora_min/knobs.py) becomes one flag; the preset gives the model
# and the defaults of the data and pretraining knobs.
PARTS = (("method, client ranks and outputs", "experiment", ExperimentConfig),
         ("LoRA", "lora", LoRAConfig), ("federation", "federation", FederationConfig),
         ("data", "data", DataConfig), ("local training (clients)", "client", ClientConfig),
         ("server", "server", ServerConfig), ("pretraining", "pretrain", PretrainConfig),
         ("compute", "compute", ComputeConfig))
PRESET_PARTS = Preset._fields  # what `preset(name, task)` sets, in order


def describe_preset(name: str) -> str:
    """A preset's sizes in a few words, for --help."""
    model, data, pretrain = preset(name)[:3]
    return (f"{model.n_layer} block{'s' * (model.n_layer > 1)} of width {model.d_model}, a "
            f"{data.vocab_size}-token vocabulary, {data.train_seqs} training sequences of "
            f"{data.seq_len} tokens per client, {pretrain.steps} pretraining steps")


def _default_text(attr: str, f: dataclasses.Field, kind: type) -> str:
    """'(default: ...)' for a knob's help: the preset's value for data and pretraining knobs."""
    if f.metadata["default_text"]:
        return f" (default: {f.metadata['default_text']})"
    if kind is bool:
        return ""
    if attr in PRESET_PARTS:  # the values of the presets (and tasks) that have this knob
        parts = {f"--preset {p}" + (f" --task {t}" if t != "synthetic" else ""):
                 preset(p, t)[PRESET_PARTS.index(attr)] for t in TASKS for p in PRESETS}
        values = {k: getattr(v, f.name) for k, v in parts.items() if hasattr(v, f.name)}
        if len(set(values.values())) > 1:
            return " (default: " + ", ".join(f"{v} with {k}" for k, v in values.items()) + ")"
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is None:
        return ""
    if isinstance(default, (list, tuple)):
        default = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return f" (default: {default})"


def _command_line_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse` for argparse: its ValueError becomes argparse's error, with the message kept."""
    def parse_word(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse_word


def add_knob(group: argparse._ArgumentGroup, attr: str, f: dataclasses.Field, hint: object,
             listed: bool = True) -> str:
    """One flag for the knob `f` of part `attr` (its type hint `hint`), left out of --help
    unless `listed`; returns the flag."""
    kind, many = hint, False
    if type(None) in get_args(kind):  # X | None
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) in (list, tuple):
        kind, many = get_args(kind)[0], True
    flag, meta = flag_of(f), f.metadata
    options = dict(dest=f"{attr}.{f.name}", default=argparse.SUPPRESS,
                   help=meta["help"] + _default_text(attr, f, kind) if listed else
                   argparse.SUPPRESS)
    if kind is bool:  # a switch: --x turns it on, or --no-x turns off one that is on by default
        action = argparse.BooleanOptionalAction if f.default else "store_true"
        group.add_argument(flag, *meta["aliases"], action=action, **options)
        return flag
    parse = _command_line_type(meta["parse"]) if meta["parse"] else kind
    group.add_argument(flag, *meta["aliases"], type=parse, choices=meta["choices"],
                       nargs="+" if many else None, metavar=None if meta["choices"] else
                       flag[2:].upper().replace("-", "_"), **options)
    return flag


def add_knobs(parser: argparse.ArgumentParser, parts: tuple[tuple[str, str, type], ...],
              unlisted: tuple[str, ...] = ()) -> dict[tuple[type, str], str]:
    """A group of flags for each (title, attribute, config class) of `parts`, one per knob,
    those of the attributes `unlisted` left out of --help; returns each knob's flag by (class,
    field name), for naming a bad value."""
    flags = {}
    for title, attr, cls in parts:
        group, hints = parser.add_argument_group(title), get_type_hints(cls)
        for f in knobs(cls):
            flags[cls, f.name] = add_knob(group, attr, f, hints[f.name], attr not in unlisted)
    return flags


def task_of(argv: list[str]) -> str:
    """The --task that `argv` names (the default when it names none or an unknown one, which
    the full parser then reports)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="synthetic")
    task = pre.parse_known_args(argv)[0].task
    return task if task in TASKS else "synthetic"


def build_parser(task: str = "synthetic") -> argparse.ArgumentParser:
    """The command line; `run --help` lists the flags that apply to `task` (the data knobs are
    the synthetic task's: another task's run refuses them, naming the flag)."""
    parser = argparse.ArgumentParser(
        prog="python -m fslora_min",
        description="Federated Sketching LoRA on a tiny transformer. With no command (or with "
                    "only run's flags), runs the demo: pretrain or reuse a base model, then a "
                    "federation of clients with heterogeneous sketching ratios. The "
                    "reproduction study is 'python -m fslora_min compare' (see 'compare "
                    "--help'; fslora_min/study/).")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one federation (see 'run --help')",
                         description="One federation. Every flag is a field of the configs in "
                                     "fslora_min/ (fslora_min/knobs.py).")
    flags = add_knobs(run, PARTS, () if task == "synthetic" else ("data",))
    g = run.add_argument_group("run")
    g.add_argument("--preset", choices=PRESETS, default="default",
                   help="model and data sizes; " + "; ".join(f"{p}: {describe_preset(p)}"
                                                            for p in PRESETS)
                        + " (default: default)")
    g.add_argument("--task", choices=TASKS, default="synthetic",
                   help="the data, with the preset's sizes for it: synthetic, the topic-Markov "
                        "language (fslora_min/data.py); shakespeare, LEAF's next-character task, "
                        "one client per speaking role of a tragedy, the base pretrained on the "
                        "other plays (fslora_min/shakespeare.py; the text in data/shakespeare/); "
                        "planted, the synthetic clients' text continued by a teacher with a "
                        "low-rank change planted in one layer (fslora_min/planted.py) "
                        "(default: synthetic)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the output folder's checkpoint (same arguments)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run the output folder holds (else it is refused)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(command_parser=run, flags=flags)
    return parser


def given_knobs(args: argparse.Namespace, attr: str) -> dict[str, object]:
    """The knobs of part `attr` given on the command line, by field name (add_knob's dests)."""
    prefix = attr + "."
    return {dest[len(prefix):]: value for dest, value in vars(args).items()
            if dest.startswith(prefix)}


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Turn parsed `run` arguments into an ExperimentConfig: each part is built from the flags
    given (the preset's values or the field defaults for the rest), which checks it; raises a
    ConfigError (a ValueError) naming the field of a bad value."""
    given = {attr: given_knobs(args, attr) for _, attr, _ in PARTS}
    from_preset = dict(zip(PRESET_PARTS, preset(args.preset, args.task)))
    if given["data"] and args.task != "synthetic":  # the data knobs are the synthetic task's
        flag = args.flags[DataConfig, next(iter(given["data"]))]
        raise ValueError(f"argument {flag}: sets the synthetic task's data; the {args.task} "
                         f"task's clients are its roles")
    parts = {attr: (replace(from_preset[attr], **given[attr]) if attr in from_preset
                    else cls(**given[attr]))
             for _, attr, cls in PARTS if attr != "experiment"}
    cfg = ExperimentConfig(**given["experiment"], **(from_preset | parts))
    ratios, clients = given["experiment"].get("ratios", ()), cfg.federation.num_clients
    if len(ratios) > clients:  # given in turn: the ones past the last client would go unused
        raise ConfigError(cfg, "ratios", f"{len(ratios)} given for {clients} clients (--clients); "
                                         f"give at most {clients}")
    return cfg


def under_flag(args: argparse.Namespace, err: ValueError) -> str:
    """An error as the command line names it: a config error under its flag, when it has one."""
    if isinstance(err, ConfigError) and (err.config, err.field) in args.flags:
        return f"argument {args.flags[err.config, err.field]}: {err.problem}"
    return str(err)


def print_summary(cfg: ExperimentConfig, history, info: dict) -> None:
    last = history.rounds[-1]
    ranks = info["trained_ranks"]
    up = [b for r in history.rounds for b in r.bytes_up]
    rows = [("device", info["device"]), ("seed", cfg.federation.seed), ("task", info["task"]),
            ("method", cfg.method), ("global rank r", cfg.lora.rank),
            ("client ranks k_i", " ".join(map(str, ranks))),
            ("global LoRA parameters", info["global_lora_parameters"]),
            ("client trainable params", f"{min(info['client_trainable_parameters'])} .. "
                                        f"{max(info['client_trainable_parameters'])}"),
            ("KiB up per client-round", f"{min(up) / 1024:.1f} .. {max(up) / 1024:.1f}"),
            ("held-out loss", f"{history.initial_loss:.4f} -> {last.heldout_loss:.4f}"),
            ("held-out accuracy", f"{history.initial_acc:.4f} -> {last.heldout_acc:.4f}"),
            ("mean client held-out loss",
             f"{sum(info['client_heldout_loss']) / len(info['client_heldout_loss']):.4f}"),
            ("dropped / rejected updates",
             f"{sum(len(r.dropped) for r in history.rounds)} / "
             f"{sum(len(r.rejected) for r in history.rounds)}"),
            ("federation wall time", f"{info['wall_seconds']:.1f} s")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print_clients(history, info)


def print_clients(history, info: dict) -> None:
    """Per client: its training sequences, k_i, and its own held-out loss and accuracy before
    round 1 and after the last round."""
    names = info["client_names"]
    width = max(len("client"), *map(len, names))
    last = history.rounds[-1]
    print(f"{'client':<{width}}  train seqs  k_i  held-out loss     held-out accuracy")
    for i, name in enumerate(names):
        print(f"{name:<{width}}  {info['client_train_sequences'][i]:>10}  "
              f"{info['trained_ranks'][i]:>3}  {history.initial_client_loss[i]:.4f} -> "
              f"{last.client_heldout_loss[i]:.4f}  {history.initial_client_acc[i]:.4f} -> "
              f"{last.client_heldout_acc[i]:.4f}")


INTERRUPTED = 130  # Ctrl-C's exit status; `main` makes it SIGTERM's when that stopped it


def main(argv: list[str] | None = None) -> int:
    """Run the command; Ctrl-C or SIGTERM stops it with one line on stderr, no traceback, and
    exit status 128 + the signal's number (fslora_min/stopping.py)."""
    with sigterm_as_ctrl_c() as received:
        try:
            status = command(sys.argv[1:] if argv is None else argv)
        except KeyboardInterrupt:  # outside a run's own handling: before or after it
            print("interrupted", file=sys.stderr)
            status = INTERRUPTED
    return exit_status(received) if status == INTERRUPTED else status


def command(argv: list[str]) -> int:
    """`main` without its signal handling."""
    if not argv or argv[0] not in ("run", "-h", "--help"):
        argv = ["run", *argv]  # the demo: run's defaults, or run's flags without the command
    parser = build_parser(task_of(argv))
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        with output_folder(cfg.out_dir, args.resume, args.overwrite):
            history, info = run_experiment(cfg, not args.no_progress, args.resume,
                                           args.overwrite)
            out = write_outputs(cfg, history, info, args.overwrite)
    except ValueError as err:  # a bad value (a ConfigError names its flag), an unusable --out
        args.command_parser.error(under_flag(args, err))
    except Interrupted as stop:
        again = [a for a in argv if a != "--overwrite"] + ([] if args.resume else ["--resume"])
        print(stop.line(shlex.join(["python", "-m", "fslora_min", *again]), args.overwrite),
              file=sys.stderr)
        return INTERRUPTED
    print_summary(cfg, history, info)
    print(f"wrote {out / 'metrics.json'} and {out / 'curves.png'}")
    stalled = history.stalled()
    if stalled:
        print(stalled, file=sys.stderr)
        return 1
    return 0
