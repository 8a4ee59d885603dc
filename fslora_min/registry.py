"""Every method by name: the names `--method` accepts and the strategy object each stands for
(FSLoRA and the paper's baselines: fslora_min/methods.py; the later ones: fslora_min/rivals.py,
and raFLoRA, which builds on FlexLoRA: fslora_min/raflora.py)."""

from __future__ import annotations

import torch

from fslora_min.methods import (FedAvgLoRA, FlexLoRA, FLoRA, HetLoRA, Method, RescaledHetLoRA,
                                ReweightedImportance, TopKImportance)
from fslora_min.raflora import RaFLoRA
from fslora_min.rivals import FedExLoRA, FedPLoRA, FFALoRA, FLASC, RoLoRA

METHODS = ("fslora", "fedavg-min", "fedavg-full", "hetlora", "hetlora-rescaled", "flexlora",
           "flora", "fslora-topk", "fslora-importance", "fed-plora", "flasc", "ffa-lora", "rolora",
           "fedex-lora", "raflora")


def make_method(name: str, r: int, init_stream: torch.Generator) -> Method:
    """The strategy object for a method name (`init_stream` seeds fresh LoRAs of FlexLoRA/FLoRA)."""
    if name == "fslora":
        return Method()
    if name in ("fedavg-min", "fedavg-full"):
        return FedAvgLoRA(full=name == "fedavg-full")
    if name == "hetlora":
        return HetLoRA()
    if name == "hetlora-rescaled":
        return RescaledHetLoRA()
    if name == "flexlora":
        return FlexLoRA(r, init_stream)
    if name == "flora":
        return FLoRA(r, init_stream)
    if name == "raflora":
        return RaFLoRA(r, init_stream)
    if name == "fslora-topk":
        return TopKImportance()
    if name == "fslora-importance":
        return ReweightedImportance()
    recent = {"fed-plora": FedPLoRA, "flasc": FLASC, "ffa-lora": FFALoRA, "rolora": RoLoRA,
              "fedex-lora": FedExLoRA}
    if name in recent:
        return recent[name]()
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")
