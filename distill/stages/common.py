"""What every stage loss shares: its result type and the autocast context."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class StepResult:
    """One step's loss (already backpropagated) and its per-layer parts.

    The step functions leave them as 0-d tensors on the device, so that a step never waits for the GPU (and can be
    captured as a CUDA graph); `to_floats` reads them all back at once, for logging."""

    loss: torch.Tensor | float
    per_layer: dict[int, torch.Tensor | float] = field(default_factory=dict)
    extra: dict[str, torch.Tensor | float] = field(default_factory=dict)

    def to_floats(self) -> StepResult:
        """The same result with plain floats, in one device-to-host copy."""
        values = [self.loss, *self.per_layer.values(), *self.extra.values()]
        tensors = [v for v in values if torch.is_tensor(v)]
        if not tensors:
            return self
        device = tensors[0].device
        flat = torch.stack(
            [v.detach().reshape(()).float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
             for v in values]
        ).tolist()
        n = len(self.per_layer)
        return StepResult(
            loss=flat[0],
            per_layer=dict(zip(self.per_layer, flat[1 : 1 + n])),
            extra=dict(zip(self.extra, flat[1 + n :])),
        )


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
