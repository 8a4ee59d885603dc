"""Where and how a run computes: the device, the engine that trains a round's clients, and the
kernel of the LoRA layers. None of these changes a result beyond float rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fslora_min.knobs import ConfigError, check_knobs, knob
from kernels.dispatch import BACKENDS, check_backend
from kernels.inputs import GEMM_CHOICES

ENGINES = ("auto", "sequential", "batched")
CPU_PASS_BYTES = 8 * 2**20  # the widest activation of one CPU pass (fslora_min/engine.py)


@dataclass
class ComputeConfig:
    device: str = knob("cpu", "cpu, cuda, or auto (a GPU when there is one)")
    engine: str = knob(
        "auto", "train a round's clients one after another (sequential, fslora_min/client.py) "
                "or all at once (batched, fslora_min/engine.py): the same result to float "
                "rounding; auto: the faster on the device", choices=ENGINES)
    clients_per_pass: int = knob(
        0, "batched engine: clients trained together in one pass (0: all on a GPU; on a CPU as "
           f"many as keep the widest activation within {CPU_PASS_BYTES // 2**20} MiB, 4 for "
           "the default model)", check="non-negative integer")
    lora_backend: str = knob(
        "auto", "kernel of the LoRA layers outside the batched engine (evaluation, the "
                "sequential engine): auto runs the Triton kernels on a GPU and PyTorch "
                "elsewhere; triton on a CPU needs TRITON_INTERPRET=1 (slow)", choices=BACKENDS)
    lora_gemm: str = knob("pointer", "with the Triton kernels: how the base GEMM meets the LoRA "
                                     "term (kernels/README.md)", choices=GEMM_CHOICES)

    def __post_init__(self) -> None:
        check_knobs(self)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(self, "device", f"must be cpu, cuda (cuda:N) or auto, "
                                                  f"got {self.device!r}") from None

    def torch_device(self) -> torch.device:
        """The device to run on; CUDA asked for but absent, or Triton forced on a CPU without
        its interpreter, is an error (before any work), never a fallback."""
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(self, "device", f"{self.device!r} requested, but torch sees no "
                                              f"CUDA GPU")
        else:
            device = torch.device(self.device)
        try:
            check_backend(self.lora_backend, self.lora_gemm, device)
        except ValueError as err:
            raise ConfigError(self, "lora_backend", str(err)) from None
        if self.lora_gemm != "pointer" and (self.lora_backend == "torch" or (
                self.lora_backend == "auto" and device.type != "cuda")):
            raise ConfigError(self, "lora_gemm", f"{self.lora_gemm!r} picks the Triton kernels' "
                                                 f"base GEMM, and --lora-backend "
                                                 f"{self.lora_backend} on {device} runs "
                                                 f"PyTorch's matmul: leave --lora-gemm out or "
                                                 f"use --lora-backend triton")
        return device
