"""What every stage loss shares: its result type and the autocast context."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class StepResult:
    """One step's loss (already backpropagated) and its per-layer parts, as floats for logging."""

    loss: float
    per_layer: dict[int, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
