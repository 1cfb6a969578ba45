"""Stage 2, hidden-state alignment: per block, match the student block's output to the teacher block's output
given the teacher block's input. Loss per layer: the mean over tokens of the L2 norm of the difference (MOHAWK);
the relative error ||diff|| / ||teacher output|| is logged beside it to compare layers of different scales."""

from __future__ import annotations

import torch

from .common import StepResult, autocast


def hidden_step(student, teacher, input_ids: torch.Tensor, precision: str) -> StepResult:
    with autocast(input_ids.device, precision):
        captured = teacher.capture(input_ids, student.ssd_layers).layers
    per_layer, relative = {}, {}
    for idx in student.ssd_layers:
        record = captured[idx]
        with autocast(input_ids.device, precision):
            out = student.model.layers[idx](record.block_input.float())
        out = out[0] if isinstance(out, tuple) else out
        diff = (out.float() - record.block_output.float()).norm(dim=-1)
        loss = diff.mean()
        loss.backward()
        per_layer[idx] = loss.item()
        relative[f"rel_{idx}"] = (diff.pow(2).sum() / record.block_output.float().pow(2).sum()).sqrt().item()
    return StepResult(loss=sum(per_layer.values()) / len(per_layer), per_layer=per_layer, extra=relative)
