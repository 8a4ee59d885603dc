"""One experiment, end to end: base model, data, client ranks, LoRA, server, federation,
outputs.

`ExperimentConfig` gathers every knob (one dataclass per part); `run_experiment` builds the pieces from the config and plays the
federation, checkpointing to out_dir/checkpoint.pt every `checkpoint_every` rounds and, with
`resume`, continuing from there (fslora_min/checkpoint.py); `write_outputs` saves metrics.json
and curves.png.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from fslora_min.ranks import (DISTRIBUTIONS, PAPER_RATIOS, ranks_from_distribution,
                                ranks_from_ratios)
from fslora_min.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from fslora_min.client import ClientConfig
from fslora_min.compute import ComputeConfig
from fslora_min.data import DataConfig
from fslora_min.federation import Federation, FederationConfig, History
from fslora_min.knobs import ConfigError, check_knobs, knob
from fslora_min.lora import LoRAConfig, adapted_layers, apply_lora, count_lora_parameters
from fslora_min.model import TEST_CONFIG, ModelConfig, Transformer, count_parameters
from fslora_min.outputs import OUTPUTS, retire
from fslora_min.planted import PlantedConfig, PlantedDataConfig
from fslora_min.pretrain import PretrainConfig, load_or_pretrain
from fslora_min.registry import METHODS, make_method
from fslora_min.rng import LORA_INIT, generator
from fslora_min.server import Server, ServerConfig
from fslora_min.shakespeare import VOCAB, ShakespeareConfig
from fslora_min.tasks import TASKS, TaskConfig, federated_data, on_base, task_name


def _ratio(text: str) -> float:
    """A sketching ratio on the command line: a number or a fraction like 1/8."""
    num, slash, den = text.partition("/")
    try:
        return float(num) / float(den) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a ratio: {text!r} (use e.g. 0.25 or 1/4)") from None


@dataclass
class ExperimentConfig:
    method: str = knob(
        "fslora", "fslora: each client trains a random k_i-subset of the r ranks, scaled r/k_i; "
                  "fedavg-min / fedavg-full: every client trains rank min_i k_i / r; hetlora / "
                  "hetlora-rescaled: the first k_i ranks at alpha/r / at alpha/k_i; flexlora: SVD of the averaged product; flora: stacking "
                  "merged into W0; fslora-topk / fslora-importance: importance-based index sets "
                  "without / with 1/pi reweighting; fed-plora: k_i random ranks trained, the "
                  "rest folded into W0; flasc: dense rank-r local LoRA, top-k messages of "
                  "FSLoRA's bytes; ffa-lora / rolora / fedex-lora (rank min_i k_i): A frozen / "
                  "A and B in alternate rounds / the averaging residual folded into W0; raflora: "
                  "flexlora with each rank index averaged over the clients holding it",
        choices=METHODS)
    # unset: the paper's ratios, unless rank_distribution is given
    ratios: list[float] | None = knob(None, "sketching ratios k_i / r in (0, 1], given to "
                                            "clients in turn", parse=_ratio,
                                      default_text=" ".join(f"{x:g}" for x in PAPER_RATIOS))
    rank_distribution: str | None = knob(None, "draw k_i from this distribution over 1..r "
                                               "instead of --ratios", choices=DISTRIBUTIONS)
    client_ranks: list[int] | None = None  # instead of both: k_i per client (e.g. profiles)
    out_dir: str = knob("runs/demo", "output folder (created if needed)", flag="--out")
    checkpoint_every: int = knob(0, "rounds between checkpoints in the output folder (0: none)",
                                 check="non-negative integer")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TaskConfig = field(default_factory=DataConfig)  # its type names the task (tasks.py)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        check_knobs(self)
        if self.ratios is not None and self.rank_distribution is not None:
            raise ConfigError(self, "ratios", f"cannot be given with --rank-distribution "
                                              f"{self.rank_distribution}: both set the client "
                                              f"ranks k_i; give one of them")
        if self.ratios is None and self.rank_distribution is None:
            self.ratios = list(PAPER_RATIOS)
        if not self.out_dir.strip():
            raise ConfigError(self, "out_dir", "must be a non-empty path")
        fed = self.federation
        if fed.num_clients > MAX_CLIENTS:
            raise ConfigError(fed, "num_clients", f"at most {MAX_CLIENTS}, got {fed.num_clients}: "
                                                  f"this one process builds and holds every "
                                                  f"client's data, and {MAX_CLIENTS} default "
                                                  f"clients already take minutes to build on 2 "
                                                  f"CPU cores")
        if fed.rounds > MAX_ROUNDS:
            raise ConfigError(fed, "rounds", f"at most {MAX_ROUNDS}, got {fed.rounds}: every "
                                             f"round's record is kept in memory and in "
                                             f"metrics.json")
        if self.data.seq_len > self.model.context:
            raise ValueError(f"data seq_len={self.data.seq_len} exceeds the model context "
                             f"{self.model.context}")
        if self.data.vocab_size != self.model.vocab_size:
            raise ValueError(f"data vocab_size={self.data.vocab_size} differs from the model's "
                             f"{self.model.vocab_size}")
        if self.client_ranks is None and self.rank_distribution is None:
            try:  # every ratio in (0, 1] and giving at least rank 1 of r: checked here, once
                ranks_from_ratios(self.ratios, len(self.ratios), self.lora.rank)
            except ValueError as err:
                raise ConfigError(self, "ratios", str(err)) from None


PRESETS = ("default", "tiny")
MAX_CLIENTS, MAX_ROUNDS = 1000, 100_000  # beyond: minutes of set-up, or a history too long


class Preset(NamedTuple):
    """What `--preset` (with `--task`) sets: sizes, and the client and server steps that suit
    them; every flag given overrides its knob."""

    model: ModelConfig
    data: TaskConfig
    pretrain: PretrainConfig
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()


def preset(name: str, task: str = "synthetic") -> Preset:
    """'default' (the demo) or 'tiny' (a 1-block width-16 model, for tests and trying flags)."""
    if task == "shakespeare":
        return shakespeare_preset(name)
    if task == "planted":
        return planted_preset(name)
    if task != "synthetic":
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if name == "default":
        return Preset(ModelConfig(), DataConfig(), PretrainConfig())
    if name == "tiny":
        data = DataConfig(vocab_size=TEST_CONFIG.vocab_size, seq_len=TEST_CONFIG.context,
                          n_base_topics=3, successors=2, train_seqs=12, heldout_seqs=4,
                          global_heldout_seqs=16)
        # a minibatch of all 12 sequences: what batch 16 drew from them, now said as it is
        return Preset(TEST_CONFIG, data, PretrainConfig(steps=150, batch_size=16, lr=1e-2),
                      ClientConfig(batch_size=data.train_seqs))
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")


def describe(cfg: ExperimentConfig) -> str:
    """What was run, in one line (a figure's title): method, task, model, r, N, M, T, H, seed."""
    fed, m, task = cfg.federation, cfg.model, task_name(cfg.data)
    name = next((p for p in PRESETS
                 if preset(p, task)[:3] == (cfg.model, cfg.data, cfg.pretrain)), None)
    model = f"{m.n_layer} layer{'s' * (m.n_layer != 1)}, width {m.d_model}"
    return (f"{cfg.method} on {task}, {f'the {name} preset ({model})' if name else model}: "
            f"r = {cfg.lora.rank}, {fed.num_clients} clients ({fed.participants} a round), "
            f"{fed.rounds} rounds of H = {cfg.client.local_steps} local steps, seed {fed.seed}")


def shakespeare_preset(name: str) -> Preset:
    """The demo's model on 64-character windows (a 20-round run in a few minutes on 2 CPU
    cores), or a one-layer width-16 model on 16-character windows (seconds; for tests).

    Both take the client lr 0.05 and server step 4 tuned for the default on seed 1
    (results/shakespeare/): the demo's lr 0.2 diverges at the rank-2 clients' scale
    c = alpha / 2 = 16 (and made the tiny run's held-out loss worse, 2.6594 -> 2.7343)."""
    steps = ClientConfig(lr=0.05), ServerConfig(server_lr=4.0)
    if name == "default":
        return Preset(ModelConfig(vocab_size=len(VOCAB)), ShakespeareConfig(),
                      PretrainConfig(steps=600), *steps)
    if name == "tiny":
        model = ModelConfig(vocab_size=len(VOCAB), context=16, n_layer=1, n_head=2, d_model=16)
        return Preset(model, ShakespeareConfig(seq_len=16),
                      PretrainConfig(steps=100, batch_size=16, lr=1e-2), *steps)
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")


def planted_preset(name: str) -> Preset:
    """The synthetic preset's model, base and clients, their text continued by a teacher whose
    last MLP projection has a rank-min(16, d) update planted (fslora_min/planted.py)."""
    model, data, pretrain, client, server = preset(name)
    planted = PlantedConfig(layer=f"blocks.{model.n_layer - 1}.mlp.proj",
                            rank=min(16, model.d_model), train_seqs=data.train_seqs)
    return Preset(model, PlantedDataConfig(**asdict(data), planted=planted), pretrain, client,
                  server)


def assign_client_ranks(cfg: ExperimentConfig) -> list[int]:
    """k_i per client: given, or from the distribution, or from the ratios."""
    fed, r = cfg.federation, cfg.lora.rank
    if cfg.client_ranks is not None:
        if len(cfg.client_ranks) != fed.num_clients:
            raise ValueError(f"{len(cfg.client_ranks)} client ranks given for "
                             f"num_clients={fed.num_clients}")
        return list(cfg.client_ranks)
    if cfg.rank_distribution is not None:
        return ranks_from_distribution(cfg.rank_distribution, fed.num_clients, r, fed.seed)
    return ranks_from_ratios(cfg.ratios, fed.num_clients, r)


def full_rank(model: nn.Module, targets: tuple[str, ...]) -> int:
    """max over the targeted nn.Linear layers of min(m, n): a LoRA of this rank is any update."""
    return max(min(m.in_features, m.out_features)
               for m in adapted_layers(model, targets).values())


def check_rank(cfg: ExperimentConfig) -> None:
    """Refuse a global rank r above min(m, n) of the smallest adapted module: B A has rank at
    most min(m, n), so the extra ranks would only add parameters. Needs only the model's shapes
    (an untrained model), so it runs before any pretraining."""
    r = cfg.lora.rank
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        layers = adapted_layers(Transformer(cfg.model), cfg.lora.targets)
    name, layer = min(layers.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
    m, n = layer.out_features, layer.in_features
    if r > min(m, n):
        raise ValueError(f"--rank {r} exceeds min(m, n) = {min(m, n)} of the adapted module "
                         f"{name} ({m} x {n}): B A has rank at most {min(m, n)} there; use "
                         f"--rank {min(m, n)} or less")


def check_batch_size(client: ClientConfig, train_sequences: list[int]) -> None:
    """Refuse a minibatch larger than every client's training set: each would be all of it."""
    if client.batch_size > max(train_sequences):
        raise ConfigError(client, "batch_size", f"{client.batch_size} exceeds every client's "
                                                f"training sequences (at most "
                                                f"{max(train_sequences)}): a minibatch would be "
                                                f"all of them; use {max(train_sequences)} or less")


def resume_key(cfg: ExperimentConfig) -> dict:
    """The configuration a checkpoint must match: all of it but where and how often to save."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "checkpoint_every")}


def restore(federation: Federation, state: dict, path: Path) -> float:
    """Load a checkpoint's federation state; returns the wall seconds the run had taken until
    it. CheckpointError when it does not fit."""
    try:
        federation.load_state_dict(state)
        return float(state["wall_seconds"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit this run: {err}") from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: `saved_round` is the last round in its checkpoint `path` (0: none)."""

    def __init__(self, saved_round: int, path: Path) -> None:
        super().__init__(saved_round, path)
        self.saved_round, self.path = saved_round, path

    def line(self, resume_command: str, overwrite: bool = False) -> str:
        """One line for the console: what was saved, and how to go on (under --overwrite,
        that the run it was to replace is still there while nothing replaced it)."""
        if not self.saved_round:
            return ("interrupted before any checkpoint was written (--checkpoint-every N saves "
                    "one every N rounds): nothing to resume"
                    + (f"; the run that was in {str(self.path.parent)!r} is left as it was"
                       * overwrite))
        return (f"interrupted; round {self.saved_round} is checkpointed in {self.path}; "
                f"resume with: {resume_command}")


def build_federation(cfg: ExperimentConfig, progress: bool = True) -> tuple[Federation, dict]:
    """Pretrain (or load) the base, adapt it with LoRA, and set up the federation and run info.

    Deterministic in `cfg`: a Flower ServerApp and every ClientApp (flower_app/) build the same
    federation from the same arguments and use their halves of it.
    """
    device = cfg.compute.torch_device()  # before any pretraining
    fed, lora, compute = cfg.federation, cfg.lora, cfg.compute
    check_rank(cfg)
    client_ranks = assign_client_ranks(cfg)
    data = federated_data(cfg.data, fed.num_clients)  # before pretraining: it checks N
    check_batch_size(cfg.client, [len(c.train) for c in data.clients])
    base, cache = load_or_pretrain(cfg.model, cfg.data, cfg.pretrain, progress=progress)
    data = on_base(cfg.data, data, base)  # the planted task's teacher continues the text
    method = make_method(cfg.method, lora.rank, generator(fed.seed, LORA_INIT, 1))
    global_rank = method.global_rank(lora.rank, client_ranks, full_rank(base, lora.targets))
    trained = method.trained_ranks(client_ranks, lora.rank)
    model = copy.deepcopy(base)
    names = apply_lora(model, global_rank, lora.alpha, lora.targets, lora.rslora,
                       compute.lora_backend, generator(fed.seed, LORA_INIT), compute.lora_gemm)
    model.to(device)
    server = Server(model, cfg.server)
    shapes = server.shapes
    info = {
        "device": str(device), "torch": str(torch.__version__), "python": platform.python_version(),
        "base_model_cache": str(cache), "base_parameters": count_parameters(base),
        "task": task_name(cfg.data), "client_names": [c.name for c in data.clients],
        "client_train_sequences": [len(c.train) for c in data.clients],
        "method": cfg.method, "global_rank": global_rank,
        "lora_modules": len(names), "global_lora_parameters": count_lora_parameters(model),
        "module_shapes": list(shapes.values()),
        "client_ranks": client_ranks, "trained_ranks": trained,
        "client_trainable_parameters": [sum(method.trainable_numbers(k, global_rank, m, n)
                                            for m, n in shapes.values()) for k in trained],
    }
    return Federation(server, data, trained, fed, cfg.client, method, compute), info


def run_experiment(cfg: ExperimentConfig, progress: bool = True, resume: bool = False,
                   overwrite: bool = False) -> tuple[History, dict]:
    """Build the federation (`build_federation`) and play it.

    With `resume`, the federation continues from out_dir/checkpoint.pt, which must have been
    written for the same configuration; the result is bit-identical to an uninterrupted run,
    and info["wall_seconds"] covers both parts. With `overwrite`, the earlier run there stays
    whole until this one has something to replace it with: its first checkpoint replaces the
    earlier checkpoint and retires the earlier outputs (`write_outputs` replaces them when this
    run saves no checkpoint). Ctrl-C (or SIGTERM, fslora_min/stopping.py) raises `Interrupted`.
    """
    path, key = Path(cfg.out_dir) / CHECKPOINT_NAME, resume_key(cfg)
    saved = load_checkpoint(path, key) if resume else None  # before any work
    saved_round = len(saved["history"]["rounds"]) if saved else 0
    if saved_round >= cfg.federation.rounds:
        raise ValueError(f"--resume: the run in {cfg.out_dir!r} has finished its "
                         f"{cfg.federation.rounds} rounds: nothing to resume (--overwrite runs "
                         f"it again)")
    try:
        federation, info = build_federation(cfg, progress)
        elapsed = 0.0 if saved is None else restore(federation, saved, path)
        if saved is not None:
            print(f"resuming from round {saved_round} of {cfg.federation.rounds} ({path})")
        if cfg.checkpoint_every:
            path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()

        def save(state: dict) -> None:
            nonlocal saved_round
            seconds = elapsed + time.perf_counter() - start
            save_checkpoint(path, key, state | {"wall_seconds": seconds})
            if overwrite and not saved_round:  # the earlier run's checkpoint is replaced now
                retire(path.parent, OUTPUTS)
            saved_round = len(state["history"]["rounds"])

        history = federation.run(progress, cfg.checkpoint_every, save)
        info["wall_seconds"] = elapsed + time.perf_counter() - start
        info["client_heldout_loss"] = history.rounds[-1].client_heldout_loss  # the last is evaluated
    except KeyboardInterrupt:
        raise Interrupted(saved_round, path) from None
    return history, info


def write_outputs(cfg: ExperimentConfig, history: History, info: dict,
                  overwrite: bool = False) -> Path:
    """metrics.json (config, run info, per-round records) and curves.png in cfg.out_dir; with
    `overwrite`, then the checkpoint of the run they replace, when this run saves none."""
    from fslora_min.plots import plot_history  # matplotlib only when writing figures

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"config": asdict(cfg), "info": info, "history": history.to_dict()}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(out / "metrics.json")
    plot_history(history, describe(cfg), out / "curves.png")
    if overwrite and not cfg.checkpoint_every:
        retire(out, (CHECKPOINT_NAME,))
    return out
