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


_collected: list[torch.Tensor] | None = None  # set by `collect_losses`; None: each loss is backpropagated at once


@contextlib.contextmanager
def collect_losses():
    """Within this context the stages hand their losses over instead of backpropagating each one (stages 1-2 call
    backward once per layer to free each layer's activations early). A DeepSpeed engine must see one backward per
    step: its ZeRO epilogue, run at each engine.backward, would otherwise drop the earlier layers' gradients. The
    per-layer losses touch disjoint parameters, so backpropagating their sum gives the same gradients."""
    global _collected
    previous, _collected = _collected, []
    try:
        yield _collected
    finally:
        _collected = previous


def backward(loss: torch.Tensor) -> None:
    if _collected is None:
        loss.backward()
    else:
        _collected.append(loss)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
