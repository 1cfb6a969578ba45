"""Stage 2, hidden-state alignment: per block, match the student block's output to the teacher block's output
given the teacher block's input (MOHAWK's L2), normalised: the loss per layer is the relative error
||student out - teacher out||_F / ||teacher out||_F of each sequence, averaged over the batch (a mean over sequences,
so that data-parallel ranks averaging their losses get the loss of the whole batch). Residual streams differ in scale by orders of
magnitude between teachers and between layers of one teacher; the relative error does not: 0 is a perfect match, and
1 is what an all-zero output would score (a block that only passes its input on scores well below 1, since the
residual stream carries most of the output)."""

from __future__ import annotations

import torch

from .common import StepResult, autocast, backward


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of ||out - target||_F / ||target||_F; out, target (b, L, H)."""
    diff = (out.float() - target.float()).flatten(1).norm(dim=-1)
    return (diff / target.float().flatten(1).norm(dim=-1)).mean()


def hidden_step(student, teacher, input_ids: torch.Tensor, precision: str) -> StepResult:
    with autocast(input_ids.device, precision):
        captured = teacher.capture(input_ids, student.ssd_layers).layers
    per_layer = {}
    for idx in student.ssd_layers:
        record = captured[idx]
        with autocast(input_ids.device, precision):
            out = student.model.layers[idx](record.block_input.float())
        out = out[0] if isinstance(out, tuple) else out
        loss = relative_error(out, record.block_output)
        backward(loss)
        per_layer[idx] = loss.detach()
    return StepResult(loss=torch.stack(list(per_layer.values())).mean(), per_layer=per_layer)
