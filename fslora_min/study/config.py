"""The study's settings: which tables each task has, the protocol's grids, seeds and horizons
(`CompareConfig`, `compare`'s flags), and the tiny task every row is trained on (`task`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fslora_min.client import ClientConfig
from fslora_min.data import DataConfig
from fslora_min.experiment import ExperimentConfig
from fslora_min.federation import FederationConfig
from fslora_min.knobs import ConfigError, check_knobs, knob
from fslora_min.lora import LoRAConfig
from fslora_min.model import ModelConfig
from fslora_min.planted import PlantedConfig, PlantedDataConfig
from fslora_min.pretrain import PretrainConfig
from fslora_min.registry import METHODS
from fslora_min.shakespeare import VOCAB, ShakespeareConfig

COMMITTED = Path(__file__).resolve().parents[2] / "results" / "compare"
MAIN_METHODS = ("fslora", "hetlora", "flexlora", "flora", "fedavg-min", "fedavg-full")
BASELINES = ("hetlora", "flexlora", "flora", "fedavg-min")  # the paper says FSLoRA beats these
IMPORTANCE_METHODS = ("fslora", "fslora-topk", "fslora-importance")
RECENT_METHODS = ("fslora", "fed-plora", "flasc", "ffa-lora", "rolora", "fedex-lora",
                  "raflora")  # since
STUDY_TASKS = ("synthetic", "planted", "shakespeare")
# The planted task adapts the MLP's output projections only (the planted layer's kind, in both
# blocks): with all 12 modules, rank-2 adapters elsewhere made up for most of what rank 2 misses
# in the planted layer, so the rank did not bind (fslora_min/planted.py).
PLANTED_TARGETS = ("proj",)  # shakespeare: fslora_min/shakespeare.py
TABLES = {"synthetic": ("main", "recent", "adamw", "server_one", "server_adam", "aggregation",
                        "hetlora_scale", "lr_scaling", "published", "importance", "global_rank",
                        "sketch_ratio"),
          "planted": ("planted_ladder", "planted_small", "planted_ratios", "planted_recent",
                      "planted_global_rank"),
          "shakespeare": ("main", "recent")}


@dataclass
class CompareConfig:
    """The study. Its knobs (made by `knob`) are `compare`'s flags, checked once by `check_knobs`
    (fslora_min/knobs.py); the plain fields are the protocol's settings, set in code."""

    task: str = knob("synthetic", "synthetic: the topic-Markov task (fslora_min/data.py); "
                                  "planted: text from a teacher with a planted rank-R* update of "
                                  "one layer, so that the rank binds (fslora_min/planted.py); "
                                  "shakespeare: LEAF's next-character task "
                                  "(fslora_min/shakespeare.py)", choices=STUDY_TASKS)
    tables: tuple[str, ...] = knob((), "which of the task's tables",
                                   choices=tuple(sorted({t for ts in TABLES.values() for t in ts})),
                                   default_text="all of the task's")
    methods: tuple[str, ...] = knob(MAIN_METHODS, "rows of the method tables, fslora among them",
                                    choices=METHODS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # evaluation seeds of the decisive tables
    reduced_seeds: tuple[int, ...] = (0, 1, 2)  # of the convention ablations
    tune_seeds: tuple[int, ...] = (100, 101)  # never reported
    lr_grid: tuple[float, ...] = knob((0.03, 0.1, 0.3, 1.0), "client learning rates (SGD) every "
                                                             "row is tuned over", check="positive")
    adamw_lr_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)  # client lr, AdamW
    server_lr_grid: tuple[float, ...] = knob((1.0, 2.0, 4.0, 8.0), "server steps eta_g (plain "
                                             "averaging) every row is tuned over",
                                             check="positive")
    adam_server_lr_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)  # server Adam(W)
    horizons: tuple[int, int, int] = (30, 100, 300)  # short, middle (tuning), long
    # Set, it replaces the last of `horizons`; None keeps it.
    rounds: int | None = knob(None, "the long horizon T of the decisive tables",
                              check="positive integer", default_text=str(horizons[2]))
    reduced_horizons: tuple[int, int, int] = (30, 60, 100)  # of the convention ablations
    rung: float = 0.25  # successive halving: every grid point to rung x middle horizon ...
    keep: float = 0.25  # ... and this fraction of them to the middle horizon
    num_clients: int = 8  # N, all participating
    rank: int = 16  # r
    lora_alpha: float = 32.0
    local_steps: int = 5  # H
    batch_size: int = 8
    pretrain_steps: int = 300
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    out_dir: str = knob("runs/compare", "output folder, each task in a folder of its own "
                                        "(OUT/TASK/); the committed study's runs are replayed, "
                                        "not retrained, whatever it is", flag="--out")

    def __post_init__(self) -> None:
        check_knobs(self)
        bad = set(self.tables) - set(TABLES[self.task])
        if bad:
            raise ConfigError(self, "tables", f"{sorted(bad)} are not tables of task "
                                              f"{self.task!r}: {TABLES[self.task]}")
        if "fslora" not in self.methods:
            raise ConfigError(self, "methods", f"must include fslora, got {self.methods}")
        if self.rounds is not None:
            if self.rounds < self.horizons[1]:
                raise ConfigError(self, "rounds", f"must be at least the middle horizon, "
                                                  f"{self.horizons[1]}, got {self.rounds}")
            self.horizons = (*self.horizons[:2], self.rounds)
        if min(len(self.seeds), len(self.reduced_seeds), len(self.tune_seeds)) < 2:
            raise ValueError("a paired interval needs at least 2 evaluation seeds and the "
                             "protocol at least 2 tuning seeds")
        if set(self.tune_seeds) & (set(self.seeds) | set(self.reduced_seeds)):
            raise ValueError(f"tuning seeds {self.tune_seeds} must not be evaluation seeds")
        for h in (self.horizons, self.reduced_horizons):
            if not 1 <= h[0] <= h[1] <= h[2]:
                raise ValueError(f"horizons must be 1 <= short <= middle <= long, got {h}")
        if not (0 < self.rung <= 1 and 0 < self.keep <= 1):
            raise ValueError(f"rung and keep must be in (0, 1], got {self.rung}, {self.keep}")

    @property
    def table_names(self) -> tuple[str, ...]:
        return self.tables or TABLES[self.task]


def quick_config(out_dir: str = "runs/compare-quick", task_name: str = "synthetic"
                 ) -> CompareConfig:
    """The main table in miniature (the tests run it): 4 clients, 2 + 2 seeds, one grid point,
    3 rounds; every code path of a row but the halving and the widening (tested apart)."""
    tables = ("planted_ladder",) if task_name == "planted" else ("main",)
    return CompareConfig(task=task_name, tables=tables, seeds=(0, 1), reduced_seeds=(0, 1),
                         lr_grid=(0.03,), adamw_lr_grid=(0.01,), server_lr_grid=(1.0,),
                         adam_server_lr_grid=(0.01,), horizons=(1, 2, 3),
                         reduced_horizons=(1, 2, 3), rung=0.5, keep=0.5, num_clients=4,
                         pretrain_steps=100, out_dir=out_dir,
                         planted=PlantedConfig(rank=4, probe_seqs=32, train_seqs=32))


def task(cfg: CompareConfig) -> ExperimentConfig:
    """The tiny task: a 2-layer width-32 transformer, 12 LoRA modules, 16-token sequences (of
    the synthetic language, or 16-character windows of Shakespeare's roles); the global
    held-out loss is evaluated every round."""
    model = ModelConfig(vocab_size=32, context=16, n_layer=2, n_head=2, d_model=32)
    data = DataConfig(vocab_size=32, seq_len=16, n_base_topics=4, successors=2, train_seqs=32,
                      heldout_seqs=8, global_heldout_seqs=64)
    if cfg.task == "shakespeare":
        model, data = replace(model, vocab_size=len(VOCAB)), ShakespeareConfig(seq_len=16)
    lora = LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha)
    if cfg.task == "planted":
        data = PlantedDataConfig(**asdict(replace(data, train_seqs=cfg.planted.train_seqs)),
                                 planted=cfg.planted)
        lora = replace(lora, targets=PLANTED_TARGETS)
    fed = FederationConfig(num_clients=cfg.num_clients, participants=cfg.num_clients,
                           rounds=cfg.horizons[2], eval_every=1)
    return ExperimentConfig(model=model, data=data, federation=fed,
                            lora=lora,
                            pretrain=PretrainConfig(steps=cfg.pretrain_steps, batch_size=32,
                                                    lr=1e-2),
                            client=ClientConfig(local_steps=cfg.local_steps,
                                                batch_size=cfg.batch_size))
