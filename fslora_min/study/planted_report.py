"""The planted task's two preconditions, checked before any of its method tables is read:

1. the planted change is worth learning: KL(teacher || base) on the scored targets is at least
   `MIN_KL` nat on every evaluation seed (fslora_min/planted.py: `planted_kl`);
2. rank binds: on the `planted_ladder` table at the long horizon, r=16 < r=4 < r=2, each gap at
   least `MIN_GAP_RATIO` times the half-width of its paired 95% interval.

If either fails, a method table on this task cannot show what sketching does to rank, whatever
its verdicts say. Written to OUT/planted/preconditions.md by `compare --task planted`.
"""

from __future__ import annotations

from dataclasses import replace

from fslora_min.federation import evaluate
from fslora_min.planted import make_teacher, planted_kl
from fslora_min.pretrain import load_or_pretrain
from fslora_min.study.config import CompareConfig, task
from fslora_min.study.protocol import paired_interval
from fslora_min.study.report import markdown
from fslora_min.study.tuning import Row
from fslora_min.tasks import federated_data, on_base

MIN_KL = 0.1  # nat
MIN_GAP_RATIO = 3.0


def seed_kl(cfg: CompareConfig, seed: int) -> dict:
    """On seed `seed`'s global held-out set (the one every run is scored on): what the planted
    change is worth (KL), and the base's and the teacher's held-out losses (start and floor)."""
    exp = task(cfg)
    data_cfg = replace(exp.data, seed=seed)
    base, _ = load_or_pretrain(exp.model, data_cfg, exp.pretrain, progress=False)
    data = on_base(data_cfg, federated_data(data_cfg, cfg.num_clients), base)
    teacher = make_teacher(base, data_cfg, cfg.planted)
    seqs, scored = data.global_heldout, data.scored_from
    return {"seed": seed, "kl": planted_kl(teacher, base, seqs, scored),
            "base": evaluate(base, seqs, scored_from=scored)[0],
            "teacher": evaluate(teacher, seqs, scored_from=scored)[0]}


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
        half = (p.high - p.low) / 2
        ratio = p.mean / half if half > 0 else (float("inf") if p.mean > 0 else 0.0)
        out.append({"pair": (low.label, high.label), "seeds": len(seeds), "interval": p,
                    "ratio": ratio, "holds": ratio >= MIN_GAP_RATIO})
    return out


def preconditions_markdown(kls: list[dict], gaps: list[dict], horizon: int) -> str:
    kl_ok = bool(kls) and all(k["kl"] >= MIN_KL for k in kls)
    rank_ok = bool(gaps) and all(g["holds"] for g in gaps)
    kl_rows = [[str(k["seed"]), f"{k['kl']:.4f}", f"{k['base']:.4f}", f"{k['teacher']:.4f}",
                "yes" if k["kl"] >= MIN_KL else "NO"] for k in kls]
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
        f"Written by `python -m fslora_min compare --task planted` (fslora_min/study/"
        f"planted_report.py). Both must hold before a planted method table can say anything "
        f"about rank.",
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
        ""])


def preconditions(cfg: CompareConfig, ladder: list[Row], horizon: int) -> str:
    """The preconditions' Markdown for the study of `cfg` (its evaluation seeds' KL; the gaps of
    the ladder's rows, smallest rank first, at `horizon`), also printed."""
    kls = [seed_kl(cfg, s) for s in cfg.seeds]
    text = preconditions_markdown(kls, ladder_gaps(ladder, horizon), horizon)
    print(text)
    return text
