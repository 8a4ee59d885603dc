"""Command line: `python -m fslora_min` runs the demo; `python -m fslora_min run --help` lists
every knob; `python -m fslora_min compare [--quick]` compares every method
(fslora_min/compare.py). Every value is validated (by argparse types or the config dataclasses,
whose errors name the value), and so are the output folder and the checkpoint to resume from,
all before any training."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import replace

from fslora_min.budgets import DISTRIBUTIONS
from fslora_min.client import OPTIMIZERS, ClientConfig
from fslora_min.compare import TABLES, CompareConfig, quick_config, run_compare
from fslora_min.data import DataConfig
from fslora_min.engine import CPU_PASS_BYTES, ENGINES
from fslora_min.experiment import (METHODS, PRESETS, ExperimentConfig, Interrupted,
                                   output_folder, preset, run_experiment, write_outputs)
from fslora_min.federation import FederationConfig
from fslora_min.lora import ALL_TARGETS
from fslora_min.pretrain import PretrainConfig
from fslora_min.server import AGGREGATIONS, SERVER_OPTIMIZERS, ServerConfig
from kernels.dispatch import BACKENDS
from kernels.lora_linear import GEMM_CHOICES


def _ratio(text: str) -> float:
    """A sketching ratio: a number or a fraction like 1/8."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a ratio: {text!r} (use e.g. 0.25 or 1/4)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d_exp, d_fed, d_cli = ExperimentConfig(), FederationConfig(), ClientConfig()
    d_srv, d_data, d_pre = ServerConfig(), DataConfig(), PretrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m fslora_min",
        description="Federated Sketching LoRA on a tiny transformer. With no command, runs the "
                    "demo (the defaults of 'run'): pretrain or reuse a base model, then a "
                    "federation of clients with heterogeneous sketching ratios.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one federation (see 'run --help')",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = run.add_argument_group("method and budgets")
    g.add_argument("--method", choices=METHODS, default=d_exp.method,
                   help="fslora: each client trains a random k_i-subset of the r ranks, scaled "
                        "r/k_i; fedavg-min / fedavg-full: every client trains rank min_i k_i / r; "
                        "hetlora: the first k_i ranks; flexlora: SVD of the averaged product; "
                        "flora: stacking merged into W0; fslora-topk / fslora-importance: "
                        "importance-based index sets without / with 1/pi reweighting")
    g.add_argument("--rank", type=int, default=d_fed.rank, help="global LoRA rank r")
    g.add_argument("--ratios", type=_ratio, nargs="+", default=None,
                   help="sketching ratios k_i/r in (0, 1], given to clients in turn (default: "
                        f"{' '.join(f'{x:g}' for x in d_exp.ratios)})")
    g.add_argument("--rank-distribution", choices=DISTRIBUTIONS, default=None,
                   help="draw k_i from this distribution over 1..r instead of --ratios")
    g.add_argument("--lora-alpha", type=float, default=d_fed.lora_alpha,
                   help="LoRA alpha: scale s = alpha/r")
    g.add_argument("--rslora", action="store_true", help="use s = alpha/sqrt(r)")
    g.add_argument("--targets", nargs="+", choices=ALL_TARGETS, default=list(d_fed.targets),
                   help="projections to adapt in every block")
    g = run.add_argument_group("federation")
    g.add_argument("--clients", type=int, default=d_fed.num_clients, help="number of clients N")
    g.add_argument("--participants", type=int, default=None,
                   help="clients per round M (default: all N)")
    g.add_argument("--rounds", type=int, default=d_fed.rounds, help="communication rounds T")
    g.add_argument("--eval-every", type=int, default=d_fed.eval_every,
                   help="rounds between global held-out evaluations")
    g.add_argument("--dirichlet-alpha", type=float, default=d_data.dirichlet_alpha,
                   help="client topic skew: Dirichlet concentration (small = strong skew)")
    g.add_argument("--dropout", type=float, default=d_fed.dropout,
                   help="probability that a participant fails mid-round, in [0, 1)")
    g = run.add_argument_group("local training (clients)")
    g.add_argument("--local-steps", type=int, default=d_cli.local_steps, help="H")
    g.add_argument("--lr", type=float, default=d_cli.lr, help="local learning rate eta_l")
    g.add_argument("--client-optimizer", choices=OPTIMIZERS, default=d_cli.optimizer,
                   help="local optimizer (state is fresh every round)")
    g.add_argument("--batch-size", type=int, default=d_cli.batch_size, help="local minibatch")
    g = run.add_argument_group("server")
    g.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default=d_srv.optimizer,
                   help="avg: X += eta_g D; sgdm/adam: FedOpt on the pseudo-gradient -D")
    g.add_argument("--global-lr", type=float, default=d_srv.global_lr, help="eta_g")
    g.add_argument("--aggregation", choices=AGGREGATIONS, default=d_srv.aggregation,
                   help="divide by the participants, or per rank by the clients that drew it")
    g = run.add_argument_group("run")
    g.add_argument("--preset", choices=PRESETS, default="default",
                   help="model and data size: default (the demo) or tiny (seconds, for tests)")
    g.add_argument("--pretrain-steps", type=int, default=None,
                   help=f"base-model pretraining steps, cached by configuration (default: the "
                        f"preset's, {d_pre.steps} for default)")
    g.add_argument("--seed", type=int, default=d_fed.seed, help="seeds every random stream")
    g.add_argument("--device", default=d_exp.device,
                   help="cpu, cuda, or auto (a GPU when there is one)")
    g.add_argument("--engine", choices=ENGINES, default=d_fed.engine,
                   help="train a round's clients one after another, or all at once (the same "
                        "result to float rounding); auto: the faster on the device "
                        "(fslora_min/engine.py)")
    g.add_argument("--clients-per-pass", type=int, default=d_fed.clients_per_pass,
                   help="batched engine: clients trained together in one pass (0: all on a "
                        "GPU; on a CPU as many as keep the widest activation within "
                        f"{CPU_PASS_BYTES // 2**20} MiB, 4 for the default model)")
    g.add_argument("--lora-backend", choices=BACKENDS, default=d_fed.lora_backend,
                   help="kernel of the LoRA layers outside the batched engine (evaluation, "
                        "the sequential engine): auto runs the Triton kernels on a GPU and "
                        "PyTorch elsewhere; triton on a CPU needs TRITON_INTERPRET=1 (slow)")
    g.add_argument("--lora-gemm", choices=GEMM_CHOICES, default=d_fed.lora_gemm,
                   help="with the Triton kernels: how the base GEMM meets the LoRA term "
                        "(kernels/README.md)")
    g.add_argument("--out", default=d_exp.out_dir, help="output folder (created if needed)")
    g.add_argument("--checkpoint-every", type=int, default=d_exp.checkpoint_every,
                   help="rounds between checkpoints in the output folder (0: none)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the output folder's checkpoint (same arguments)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run the output folder holds (else it is refused)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cmp = sub.add_parser("compare", help="all methods and the ablations over several seeds, "
                                         "with tables and figures (fslora_min/compare.py)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cmp.add_argument("--quick", action="store_true",
                     help="2 seeds, 1 lr, 3 rounds, 4 clients: every output in a few minutes")
    cmp.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                     help="the clients' local optimizer")
    cmp.add_argument("--lr-grid", type=_positive_float, nargs="+", default=None,
                     help="local learning rates every row is tuned over (default: compare.py's)")
    cmp.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES),
                     help="which tables to produce (main includes importance and coverage)")
    cmp.add_argument("--rounds", type=_positive_int, default=None,
                     help="communication rounds T (default: compare.py's)")
    cmp.add_argument("--out", default=None,
                     help="output folder (default results/compare, or results/compare-quick)")
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Turn parsed arguments into an ExperimentConfig; raises ValueError naming a bad value."""
    participants = args.clients if args.participants is None else args.participants
    fed = FederationConfig(num_clients=args.clients, participants=participants,
                           rounds=args.rounds, rank=args.rank, lora_alpha=args.lora_alpha,
                           rslora=args.rslora, targets=tuple(args.targets), seed=args.seed,
                           eval_every=args.eval_every, dropout=args.dropout,
                           engine=args.engine, clients_per_pass=args.clients_per_pass,
                           lora_backend=args.lora_backend, lora_gemm=args.lora_gemm)
    client = ClientConfig(local_steps=args.local_steps, lr=args.lr,
                          optimizer=args.client_optimizer, batch_size=args.batch_size)
    server = ServerConfig(optimizer=args.server_optimizer, global_lr=args.global_lr,
                          aggregation=args.aggregation)
    model, data, pretrain = preset(args.preset)
    if args.pretrain_steps is not None:
        pretrain = replace(pretrain, steps=args.pretrain_steps)
    return ExperimentConfig(
        method=args.method, ratios=args.ratios, rank_distribution=args.rank_distribution,
        device=args.device, out_dir=args.out, checkpoint_every=args.checkpoint_every,
        model=model, data=replace(data, dirichlet_alpha=args.dirichlet_alpha),
        pretrain=pretrain, federation=fed, client=client, server=server)


def print_summary(cfg: ExperimentConfig, history, info: dict) -> None:
    last = history.rounds[-1]
    ranks = info["client_ranks"]
    up = [b for r in history.rounds for b in r.bytes_up]
    rows = [("device", info["device"]), ("seed", cfg.federation.seed),
            ("method", cfg.method), ("global rank r", cfg.federation.rank),
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["run"])
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "compare":

        out = args.out or ("results/compare-quick" if args.quick else CompareConfig().out_dir)
        cfg = quick_config(out) if args.quick else CompareConfig(out_dir=out)
        cfg = replace(cfg, optimizer=args.optimizer, tables=tuple(args.tables),
                      lr_grid=tuple(args.lr_grid) if args.lr_grid else cfg.lr_grid,
                      rounds=args.rounds or cfg.rounds)
        run_compare(cfg)
        return 0
    try:
        cfg = config_from_args(args)
        with output_folder(cfg.out_dir, args.resume, args.overwrite):
            history, info = run_experiment(cfg, not args.no_progress, args.resume,
                                           args.overwrite)
            out = write_outputs(cfg, history, info)
    except ValueError as err:
        parser.error(str(err))
    except Interrupted as stop:
        again = [a for a in argv or ["run"] if a != "--overwrite"]
        print(stop.line(shlex.join(["python", "-m", "fslora_min", *again]
                                   + ([] if args.resume else ["--resume"]))), file=sys.stderr)
        return 130
    print_summary(cfg, history, info)
    print(f"wrote {out / 'metrics.json'} and {out / 'curves.png'}")
    stalled = history.stalled()
    if stalled:
        print(stalled, file=sys.stderr)
        return 1
    return 0
