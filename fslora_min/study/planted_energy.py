"""Rank collapse on the planted task (fslora_min/study/rank_energy.py has the rule and the
linear task): each row of the planted_ratios and planted_recent tables at the point the committed
study tuned it (replayed, never retuned), evaluation seed 0, the long horizon; every 10 rounds
the planted layer's update W - W0 (its singular values, in weight and in whitened units) and the
energy of each rank index j, e_j = s ||B[:, j]|| ||A[j, :]|| (the norm of index j's term of
s B A). A row whose tuning is not finished in the study's runs.jsonl is skipped and named.
Writes results/compare/planted/rank_energy.md, rank_energy.png and energy.jsonl.

    python -m fslora_min.study.rank_energy --task planted
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fslora_min.experiment import ExperimentConfig, build_federation
from fslora_min.lora import global_factors
from fslora_min.planted import make_teacher, probe_inputs
from fslora_min.pretrain import load_or_pretrain
from fslora_min.study.compare import study
from fslora_min.study.config import COMMITTED, CompareConfig
from fslora_min.study.protocol import NOT_REPRODUCED, REPRODUCED
from fslora_min.study.rank_energy import (EVERY, collapse_table, collapsed, draw_spectra,
                                          index_energy, split, top_share, update_spectrum)
from fslora_min.study.report import mean_std, write_atomic
from fslora_min.study.runs import RunCache, cached_record, machine, run_settings
from fslora_min.study.tuning import Row, with_run

VERSION = 2  # of the planted recordings: bump when a change alters what they hold
PLANTED_TABLES = ("planted_ratios", "planted_recent")
PLANTED_OUT = COMMITTED / "planted"


def record_planted(exp: ExperimentConfig, every: int, root: torch.Tensor) -> dict:
    """Play `exp` with `Federation.run` (and train_run's settings, so its curve is the study's
    run's), and at round 0, every `every` rounds and the last record the planted
    layer's update spectrum, in weight and in whitened units (`root`, `planted_target`), and
    per-index energy. Recording reads the factors only: it draws no random numbers and moves
    no weight, which `curve` lets the caller check."""
    exp = replace(exp, federation=replace(exp.federation, client_eval=False))  # as train_run
    federation, info = build_federation(exp, progress=False)
    name, server = exp.data.planted.layer, federation.server
    layer = server.modules[name]
    w0 = layer.weight.detach().clone()  # (m, n) the base's weight
    out = {"method": exp.method, "seed": exp.federation.seed, "lr": exp.client.lr,
           "server_lr": exp.server.server_lr, "layer": name, "global_rank": info["global_rank"],
           "rounds": [], "spectra": [], "whitened": [], "energy": []}

    def snapshot(t: int) -> None:
        with torch.no_grad():
            B, A = global_factors(server.model)[name]  # (m, r), (r, n)
            out["rounds"].append(t)
            out["spectra"].append(update_spectrum(layer.weight, w0, B, A, layer.scale).tolist())
            out["whitened"].append(update_spectrum(layer.weight, w0, B, A, layer.scale,
                                                   root).tolist())
            out["energy"].append(index_energy(B, A, layer.scale).tolist())

    snapshot(0)
    # Federation.run's checkpoint hook fires after every `every`-th round and the last: the
    # recording reads the factors there, so the run is the study's run, loop and all
    history = federation.run(progress=False, every=every,
                             save=lambda _state: snapshot(len(federation.history.rounds)))
    return out | {"curve": [history.initial_loss] + [r.heldout_loss for r in history.rounds],
                  "machine": machine()}


def planted_target(exp: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The planted change Delta (m, n), the teacher's weight minus the base's in the planted
    layer, and Sigma^{1/2} (n, n), the root of its inputs' second moments on the probe text
    that planted_delta whitens by: Delta = sum_j (g / sigma_j) u_j v_j^T is flat in whitened
    units (Delta Sigma^{1/2} = g sum_j u_j v_j^T), not in weight units."""
    base, _ = load_or_pretrain(exp.model, exp.data, exp.pretrain, progress=False)
    teacher = make_teacher(base, exp.data, exp.data.planted)
    name = exp.data.planted.layer
    delta = teacher.get_submodule(name).weight - base.get_submodule(name).weight  # (m, n)
    inputs = probe_inputs(base, exp.data, exp.data.planted)  # (tokens, n) float64
    eigval, eigvec = torch.linalg.eigh(inputs.T @ inputs / len(inputs))  # (n,), (n, n)
    return delta.detach().double(), eigvec @ torch.diag(eigval.clamp(min=0).sqrt()) @ eigvec.T


def energy_key(exp: ExperimentConfig, every: int) -> str:
    """SHA-256 of what changes a recording: the run's settings (runs.run_settings), its
    rounds, the recording's interval and VERSION."""
    return hashlib.sha256(json.dumps({"version": VERSION, "run": run_settings(exp),
                                      "rounds": exp.federation.rounds, "record_every": every},
                                     sort_keys=True).encode()).hexdigest()


def lower(claim: dict, word: str = "verdict") -> str | None:
    """Which row of a claim a < b its verdict (`word`: "verdict", Holm-corrected, or "raw")
    finds lower; None: undecided."""
    said = claim[word]
    return (claim["a"] if said in (REPRODUCED, f"{claim['a']} lower") else
            claim["b"] if said in (NOT_REPRODUCED, f"{claim['b']} lower") else None)


def explained(claims: list[dict], verdicts: dict[str, bool], word: str) -> list[dict]:
    """The claims whose verdict (`word`, as in `lower`) collapse would explain: the lower
    method did not collapse, the higher one did."""
    return [c for c in claims if lower(c, word) and verdicts.get(lower(c, word)) is False
            and verdicts.get(c["b"] if lower(c, word) == c["a"] else c["a"]) is True]


def verdict_text(claims: list[dict], units: dict[str, dict[str, bool]]) -> str:
    """The long-horizon claims, each with whether its two methods collapsed in each of `units`
    ({name: verdicts}), and which decided ones collapse explains in each, Holm-corrected and
    raw (Holm's family is the task's claims finished so far, so it grows as the study runs)."""
    def tag(m: str) -> str:
        return (f"{m} (collapsed: " + " / ".join(("yes" if v[m] else "no") if m in v else "-"
                                                 for v in units.values())
                + ")" if m in next(iter(units.values())) else f"{m} (not recorded)")

    lines = "; ".join(f"{tag(c['a'])} vs {tag(c['b'])}: {c['verdict']} (raw: {c['raw']})"
                      for c in claims)
    why = "; ".join(f"{label}, " + ", ".join(
        f"in {name} {len(e)} of {sum(1 for c in claims if lower(c, word))} ("
        + (", ".join(f"{c['a']} vs {c['b']}" for c in e) or "none") + ")"
        for name, v in units.items() for e in [explained(claims, v, word)])
        for label, word in (("Holm-corrected", "verdict"), ("raw", "raw")))
    family = max(c["family"] for c in claims)
    return (f"The planted tables' long-horizon verdicts ({claims[0]['rounds']} rounds, "
            f"replayed from the study's runs; Holm-corrected over the {family} claim x horizon "
            f"cells of the task finished when this ran; collapsed in {' / '.join(units)}): "
            f"{lines}. Collapse explains a decided verdict when the lower method did not "
            f"collapse and the higher one did: {why}.")


def yardstick(units: dict[str, dict[str, bool]]) -> str:
    """What the rule reads on FedAvg-LoRA at full rank, where every client trains every index,
    so aggregation cannot collapse any: "collapsed" there is not raFLoRA's collapse."""
    reads = {name: v["fedavg-full"] for name, v in units.items() if "fedavg-full" in v}
    if not reads:
        return ""
    return ("FedAvg-LoRA at full rank (every client trains all r indices, so aggregation "
            "cannot collapse any) reads collapsed " + ", ".join(
                f"in {name}: {'yes' if c else 'no'}" for name, c in reads.items())
            + ("; where it reads yes, the rule is crossed without rank-heterogeneous "
               "aggregation, so there it does not isolate collapse. " if any(reads.values())
               else ". "))


def bit_for_bit(run: dict, committed: dict | None) -> str:
    """Whether a recorded run's held-out curve is the committed run's, bit for bit; float32
    roundings differ across CPUs, so a difference counts only on the committed run's machine."""
    if committed is None:
        return "no committed seed-0 run yet"
    mine, theirs = run["curve"], committed["curve"][:len(run["curve"])]
    if mine == theirs:
        return "yes"
    gap = max(abs(a - b) for a, b in zip(mine, theirs))
    where = ("same machine" if run["machine"] == committed["machine"]
             else f"other machine: {committed['machine']}")
    return f"NO (largest gap {gap:.2e}, {where})"


def tuned_rows(cfg: CompareConfig, study_dir: Path
               ) -> tuple[dict[str, tuple[ExperimentConfig, Row]], list[dict]]:
    """The rows of PLANTED_TABLES, {label: (its experiment, tuned and evaluated)}, and their
    claims at the long horizon, from the study in `study_dir` replayed (nothing trained; Holm's
    family is the whole task's, as in the committed tables)."""
    cache = RunCache(Path(os.devnull), [study_dir / "runs.jsonl"], train=False)
    rows, claims = {}, []
    for table, tuned, cs in study(cfg, cache):
        if table.name in PLANTED_TABLES:
            for spec, row in zip(table.rows, tuned):
                rows.setdefault(spec.label, (spec.exp, row))  # fslora is in both tables
            claims += [c for c in cs if c["horizon"] == "long"]
    return rows, claims


def recordings(tuned: dict[str, tuple[ExperimentConfig, Row]], root: torch.Tensor,
               horizon: int) -> tuple[dict[str, dict], list[str], list[str]]:
    """Each tuned row's recording (from PLANTED_OUT/energy.jsonl, or played and appended),
    whether its seed-0 curve is the committed run's, and the committed held-out loss at
    `horizon` over the row's seeds."""
    runs, checks, losses = {}, [], []
    for method, (exp, row) in tuned.items():
        runs[method] = cached_record(PLANTED_OUT / "energy.jsonl", energy_key(exp, EVERY),
                              lambda: record_planted(exp, EVERY, root))
        checks.append(bit_for_bit(runs[method], next((r for r in row.runs if r["seed"] == 0),
                                                     None)))
        losses.append(f"{mean_std([r['curve'][horizon] for r in row.runs])} "
                      f"({len(row.runs)} seeds)")
        print(f"{method:12s} lr {row.lr:g} step {row.server_lr:g}: seed-0 curve = committed "
              f"run's: {checks[-1]}")
    return runs, checks, losses


def planted(study_dir: Path) -> None:
    """The planted task: every row of PLANTED_TABLES at its tuned point (the study in
    `study_dir` replayed), recorded into PLANTED_OUT/energy.jsonl (or read from it)."""
    torch.set_num_threads(1)  # as the study trains: its runs' float32 bits are one thread's
    PLANTED_OUT.mkdir(parents=True, exist_ok=True)
    cfg = CompareConfig(task="planted")
    horizon = cfg.horizons[2]
    rows, claims = tuned_rows(cfg, study_dir)
    tuned = {m: (with_run(exp, 0, row.lr, row.server_lr, horizon), row)
             for m, (exp, row) in rows.items() if row.choice.point is not None}
    if not tuned:
        raise SystemExit(f"no row of {PLANTED_TABLES} is tuned in {study_dir / 'runs.jsonl'}: "
                         f"nothing to record")
    exp = next(iter(tuned.values()))[0]  # every row's task: seed 0's data, one target
    delta, root = planted_target(exp)
    target = {"weight units": torch.linalg.svdvals(delta).tolist(),
              "whitened units": torch.linalg.svdvals(delta @ root).tolist()}
    runs, checks, losses = recordings(tuned, root, horizon)
    r_star, k = exp.data.planted.rank, min(exp.client_ranks)
    share = {name: top_share(t, k) for name, t in target.items()}
    panels = {m: (run["rounds"], np.array(run["spectra"])[:, :r_star]) for m, run in runs.items()}
    white = {m: run["whitened"][-1][:r_star] for m, run in runs.items()}
    units = {"whitened units": {m: collapsed(v, k, share["whitened units"])
                                for m, v in white.items()}}
    by_index = [top_share(run["energy"][-1], k) for run in runs.values()]
    # raFLoRA's collapse, index by index: e_j's energy in the indices every client trains,
    # against k / r of a spread over the r global indices (FLoRA's restart at 0 after merging)
    units["rank indices"] = {m: collapsed(run["energy"][-1], k, k / run["global_rank"])
                             for m, run in runs.items() if sum(run["energy"][-1]) > 0}
    table, units["weight units"] = collapse_table(
        {m: v[-1].tolist() for m, (_, v) in panels.items()}, k, share["weight units"],
        0.5 * min(target["weight units"][:r_star]),
        {"global rank": [str(run["global_rank"]) for run in runs.values()],
         f"whitened: top-{k} share (target {share['whitened units']:.3f})":
             [f"{top_share(v, k):.3f}" for v in white.values()],
         "whitened: collapsed": ["yes" if c else "no" for c in units["whitened units"].values()],
         f"indices < {k}: share of sum_j e_j^2 (flat: {k} / r)":
             ["-" if math.isnan(x) else f"{x:.3f}" for x in by_index],
         "indices: collapsed": [("yes" if units["rank indices"][m] else "no")
                                if m in units["rank indices"] else "-" for m in runs],
         f"held-out loss @ {horizon}, committed": losses,
         "seed-0 curve = committed (bit for bit)": checks})
    units = {name: units[name] for name in [*target, "rank indices"]}  # weight units first
    layer = exp.data.planted.layer
    draw_spectra(panels, f"Planted task, k_i = {','.join(map(str, sorted(set(exp.client_ranks))))}"
                 f", r = {exp.lora.rank}, planted rank-{r_star} change of {layer} (seed 0): the "
                 f"update's top {r_star} singular values (weight units) over rounds (black ticks: "
                 f"the target's)", PLANTED_OUT / "rank_energy.png", target["weight units"][:r_star])
    write_atomic(PLANTED_OUT / "rank_energy.md", planted_text(
        study_dir, horizon, layer, r_star, k, target, share, units,
        [m for m in rows if m not in tuned], [m for m, run in runs.items()
                                              if run["global_rank"] == k], claims) + table
        + "\n![singular values over rounds](rank_energy.png)\n")
    print((PLANTED_OUT / "rank_energy.md").read_text())


def planted_text(study_dir: Path, horizon: int, layer: str, r_star: int, k: int,
                 target: dict[str, list[float]], share: dict[str, float],
                 units: dict[str, dict[str, bool]], skipped: list[str], at_k: list[str],
                 claims: list[dict]) -> str:
    """rank_energy.md's heading and paragraph: what was recorded, the target's spectrum, who
    collapsed in each unit (and who is held at rank k, `at_k`), the rows skipped, and the
    verdicts beside collapse."""
    unwritten = [f"{t}.md" for t in PLANTED_TABLES if not (study_dir / f"{t}.md").exists()]
    spans = "; ".join(f"in {name} from {t[0]:.3g} to {t[r_star - 1]:.3g}, its top {k} of "
                      f"{r_star} holding {share[name]:.3f} of its energy"
                      for name, t in target.items())
    everyone = next(iter(units.values()))
    who = "; ".join(f"in {name}, collapsed: {yes}; not collapsed: {no}"
                    + "".join(f"; no adapter energy at the end: {m}" for m in everyone
                              if m not in v)
                    for name, v in units.items() for yes, no in [split(v)])
    return (f"# Rank collapse on the planted task\n\nWritten by `python -m "
            f"fslora_min.study.rank_energy --task planted` from `energy.jsonl`: each row of "
            f"{' and '.join(PLANTED_TABLES)} at the client lr and server step the study tuned, "
            f"evaluation seed 0, {horizon} rounds played round by round; every {EVERY} rounds "
            f"the singular values of the update W - W0 of {layer} (W0 the base's weight, so "
            f"FLoRA's and FedEx-LoRA's merges count), in weight units and in whitened units "
            f"((W - W0) Sigma^(1/2), Sigma the second moments of the layer's inputs on the "
            f"base's text that the planted change is built from), and the energy of each rank "
            f"index, e_j = s ||B[:, j]|| ||A[j, :]||. The target, the teacher's change of that "
            f"layer (seed 0), has its {r_star} singular values {spans}. Collapsed (over twice "
            f"the target's share in the update's top min k_i = {k} values, the linear task's "
            f"rule; for rank indices, over twice k / r of e_j's energy in the indices j < {k} "
            f"that every client trains): {who}. (At global rank min k_i = {k}, so at most {k} "
            f"singular values but for merges into W0, by construction: "
            f"{', '.join(at_k) or 'none'}. FlexLoRA's and raFLoRA's servers store the update "
            f"as its SVD, index j on its j-th singular direction, so their index shares are "
            f"their spectral shares.) Not recorded, their tuning not finished in the "
            f"study's runs.jsonl: {', '.join(skipped) or 'none'}. {yardstick(units)}"
            f"{verdict_text(claims, units)}"
            + (f" ({', '.join(unwritten)} not written yet: the study was still training.)"
               if unwritten else "") + "\n\n")
