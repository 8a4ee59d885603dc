"""Kernels for the masked low-rank linear of a sketched LoRA layer (see kernels/reference.py)."""

from kernels.dispatch import lora_linear

__all__ = ["lora_linear"]
