"""The planted task's two preconditions, checked before any of its method tables is read:

1. the planted change is worth learning: KL(teacher || base) on the scored targets is at least
   `MIN_KL` nat on every evaluation seed (fslora_min/planted.py: `planted_kl`);
2. rank binds: on the `planted_ladder` table at the long horizon, r=16 < r=4 < r=2, each gap at
   least `MIN_GAP_RATIO` times the half-width of its paired 95% interval.

If either fails, a method table on this task cannot show what sketching does to rank, whatever
its verdicts say. Beside them, one measurement of how much rank CAN bind: the KL a rank-k
student must leave at best if it learnt k of the planted terms exactly, the k worth the most
(`kl_left`); least squares with a flat spectrum would leave (R* - k) / R* of it. Written to
OUT/planted/preconditions.md by `compare --task planted`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn

from fslora_min.data import DataConfig
from fslora_min.federation import evaluate
from fslora_min.planted import (PlantedConfig, make_teacher, planted_kl, probe_inputs,
                               teacher_from)
from fslora_min.pretrain import load_or_pretrain
from fslora_min.study.config import CompareConfig, task
from fslora_min.study.protocol import Paired, paired_interval
from fslora_min.study.report import markdown
from fslora_min.study.tuning import Row
from fslora_min.tasks import federated_data, on_base

MIN_KL = 0.1  # nat
MIN_GAP_RATIO = 3.0
LEFT_AT = (2, 4, 8)  # k of kl_left


def seed_kl(cfg: CompareConfig, seed: int) -> dict:
    """On seed `seed`'s global held-out set (the one every run is scored on): what the planted
    change is worth (KL), and the base's and the teacher's held-out losses (start and floor)."""
    exp = task(cfg)
    data_cfg = replace(exp.data, seed=seed)
    base, _ = load_or_pretrain(exp.model, data_cfg, exp.pretrain, progress=False)
    data = on_base(data_cfg, federated_data(data_cfg, cfg.num_clients), base)
    teacher = make_teacher(base, data_cfg, cfg.planted)
    seqs, scored = data.global_heldout, data.scored_from
    kl = planted_kl(teacher, base, seqs, scored)
    left = kl_left(base, teacher, data_cfg, cfg.planted, seqs, scored)
    return {"seed": seed, "kl": kl, "base": evaluate(base, seqs, scored_from=scored)[0],
            "teacher": evaluate(teacher, seqs, scored_from=scored)[0],
            "left": {k: v / kl for k, v in left.items()}, "r_star": cfg.planted.rank}


def kl_left(base: nn.Module, teacher: nn.Module, data_cfg: DataConfig, planted: PlantedConfig,
            seqs: torch.Tensor, scored: int) -> dict[int, float]:
    """For each k of LEFT_AT: KL(teacher || base + the k planted terms worth the most, each
    alone) on `seqs`, what a student that learnt exactly those k terms would still miss."""
    inputs = probe_inputs(base, data_cfg, planted)  # one probe for every partial teacher

    def left(keep: list[int]) -> float:
        return planted_kl(teacher, teacher_from(base, data_cfg, planted, inputs, keep), seqs,
                          scored)

    alone = [left([j]) for j in range(planted.rank)]
    order = sorted(range(planted.rank), key=alone.__getitem__)  # least left first
    return {k: left(order[:k]) for k in LEFT_AT if k < planted.rank}


def half_widths(gap: float, p: Paired) -> float:
    """`gap` in half-widths of p's 95% interval (+inf: a positive gap with no spread)."""
    half = (p.high - p.low) / 2
    return gap / half if half > 0 else (math.inf if gap > 0 else 0.0)


def ladder_gaps(rows: list[Row], horizon: int) -> list[dict]:
    """Adjacent rungs of the ladder (rows ordered by rank, smallest first): for each pair
    (lower rank, higher rank) the paired interval of L_lower - L_higher at `horizon` and whether
    the gap is positive and >= MIN_GAP_RATIO half-widths."""
    out = []
    for low, high in zip(rows, rows[1:]):
        a = {r["seed"]: r["curve"][horizon] for r in low.runs}
        b = {r["seed"]: r["curve"][horizon] for r in high.runs}
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            out.append({"pair": (low.label, high.label), "seeds": len(seeds), "interval": None,
                        "ratio": float("nan"), "holds": False})
            continue
        p = paired_interval([a[s] - b[s] for s in seeds])
        ratio = half_widths(p.mean, p)
        out.append({"pair": (low.label, high.label), "seeds": len(seeds), "interval": p,
                    "ratio": ratio, "holds": ratio >= MIN_GAP_RATIO})
    return out


def gap_left(ladder: list[Row], kls: list[dict], horizon: int) -> list[list[str]]:
    """Per ladder row, per seed of `kls`: (L_r - L_teacher) / (L_base - L_teacher) at `horizon`,
    the share of the loss gap the trained rank-r model leaves (beside section 3's KL shares)."""
    out = []
    for row in ladder:
        curves = {r["seed"]: r["curve"] for r in row.runs}
        left = [(c[horizon] - k["teacher"]) / (c[0] - k["teacher"]) if (c := curves.get(
            k["seed"])) else None for k in kls]
        out.append([row.label] + ["-" if x is None else f"{x:.3f}" for x in left])
    return out


def preconditions_markdown(kls: list[dict], gaps: list[dict], horizon: int,
                           trained: list[list[str]]) -> str:
    kl_ok = bool(kls) and all(k["kl"] >= MIN_KL for k in kls)
    rank_ok = bool(gaps) and all(g["holds"] for g in gaps)
    kl_rows = [[str(k["seed"]), f"{k['kl']:.4f}", f"{k['base']:.4f}", f"{k['teacher']:.4f}",
                "yes" if k["kl"] >= MIN_KL else "NO"] for k in kls]
    ks = sorted({k for x in kls for k in x["left"]})
    left_rows = [[str(x["seed"])] + [f"{x['left'][k]:.3f}" for k in ks] for x in kls]
    r_star = kls[0]["r_star"] if kls else 0
    gap_rows = []
    for g in gaps:
        p = g["interval"]
        low, high = g["pair"]
        gap_rows.append([f"L({low}) - L({high})", str(g["seeds"]),
                         f"{p.mean:+.4f} [{p.low:+.4f}, {p.high:+.4f}]" if p else "pending",
                         f"{g['ratio']:.1f}", "yes" if g["holds"] else "NO"])
    return "\n".join([
        "# The planted task's preconditions",
        "",
        "Written by `python -m fslora_min compare --task planted` (fslora_min/study/"
        "planted_report.py). Both must hold before a planted method table can say anything "
        "about rank.",
        "",
        f"## 1. The planted change is worth learning: KL >= {MIN_KL} nat on every seed: "
        f"**{'holds' if kl_ok else 'FAILS'}**",
        "",
        "KL(teacher || base) per scored target of the global held-out set, and the held-out "
        "loss of the base (what every run starts from) and of the teacher (the floor).",
        "",
        markdown(["seed", "KL (nat)", "base loss", "teacher loss", f">= {MIN_KL}"], kl_rows),
        "",
        f"## 2. Rank binds: r=16 < r=4 < r=2 at round {horizon}, each gap >= {MIN_GAP_RATIO:g} "
        f"half-widths: **{'holds' if rank_ok else 'FAILS'}**",
        "",
        "From the `planted_ladder` table (FedAvg-LoRA, every client at rank r, each row tuned); "
        "paired over the evaluation seeds, 95% t-interval.",
        "",
        markdown(["gap", "seeds", "mean [95% CI]", "gap / half-width", f">= {MIN_GAP_RATIO:g}"],
                 gap_rows),
        "",
        "## 3. How much rank can bind: the KL a rank-k student leaves at best",
        "",
        f"KL(teacher || base + the k planted terms worth the most) / KL(teacher || base), "
        f"per seed: what a student that learnt exactly those k of the R* = {r_star} terms "
        f"would still miss. In least squares with a flat spectrum (the linear task) it would be "
        + ", ".join(f"{(r_star - k) / r_star:.3f} at k = {k}" for k in ks) + ".",
        "",
        markdown(["seed"] + [f"k = {k}" for k in ks], left_rows),
        "",
        f"What the ladder's trained models leave of the loss gap (L_r - L_teacher) / (L_base - "
        f"L_teacher) at round {horizon}, on the same held-out sets (rank r in each of the "
        f"adapted modules):",
        "",
        markdown(["row"] + [f"seed {k['seed']}" for k in kls], trained),
        "",
        contrast(kls, trained),
        ""])


def contrast(kls: list[dict], trained: list[list[str]]) -> str:
    """One sentence per rank k in both tables: the trained share against the exact-terms share."""
    parts = []
    for row in trained:
        k = int(row[0].split("=")[1])
        shares = [float(x) for x in row[1:] if x != "-"]
        exact = [x["left"][k] for x in kls if k in x["left"]]
        if shares and exact:
            parts.append(f"rank {k} leaves {min(shares):.2f}-{max(shares):.2f} of the loss gap "
                         f"where its best {k} planted terms, learnt exactly, would leave "
                         f"{min(exact):.2f}-{max(exact):.2f} of the KL")
    if not parts:
        return ""
    return ("Trained, " + "; ".join(parts) + ". Where the trained share is the smaller, a "
            "low-rank adapter reproduces more of the teacher than that many of its planted "
            "directions would: the loss sees the change through fewer directions than its rank, "
            "and rank binds less than the least-squares picture of the linear task says (whether "
            "the softmax or the second adapted module accounts for it is not measured here).")


def preconditions(cfg: CompareConfig, ladder: list[Row], horizon: int) -> str:
    """The preconditions' Markdown for the study of `cfg` (its evaluation seeds' KL; the gaps of
    the ladder's rows, smallest rank first, at `horizon`), also printed."""
    kls = [seed_kl(cfg, s) for s in cfg.seeds]
    text = preconditions_markdown(kls, ladder_gaps(ladder, horizon), horizon,
                                  gap_left(ladder, kls, horizon))
    print(text)
    return text
