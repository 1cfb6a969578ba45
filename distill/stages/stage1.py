"""Stage 1, matrix orientation: per layer and head, fit the SSD mixing matrix to the teacher's attention matrix.

The student's mixer reads the teacher's own layer input (after the block's input norm); the loss per layer is
MOHAWK's Frobenius distance, normalised by the length: the mean over batch and heads of
|| softmax(QK^T/sqrt(d) + mask) - M_SSD ||_F / sqrt(L), the root-mean-square over query rows of the distance between
an attention row (a distribution over keys) and the SSD's row. Its size therefore means the same whatever the
teacher, width or sequence length: 0 is a perfect fit, and M_SSD = 0 scores the RMS norm of the attention rows, at
most 1 (1 when each query attends to one key). Values far above 1 mean the SSD matrix has blown up (the 1e13 that
unnormalised ports of MOHAWK report), not that the teacher is unusual. Layers are independent, so each layer's loss
is backpropagated at once and its activations freed before the next layer's.
"""

from __future__ import annotations

import torch

from .. import kernels
from .common import StepResult, autocast, backward


def layer_matrix_loss(block, record, precision: str) -> torch.Tensor:
    """One layer's stage-1 loss: its mixer on the teacher's layer input against the teacher's attention."""
    with autocast(record.block_input.device, precision):
        inputs, _ = block.self_attn.ssd_inputs(block.input_layernorm(record.block_input.float()))
    length = record.q.shape[1]
    # B and C go in as the projection made them (bf16 under autocast): the kernel multiplies them on the tensor
    # cores with float32 accumulation, which is the float32 product of the bf16 values (the reference upcasts them).
    # Upcasting them first sent those products through 3xTF32 and made stage 1 the slowest stage per token.
    return kernels.stage1_loss(
        record.q, record.k, record.softmax_scale, inputs.log_a, inputs.B, inputs.C, inputs.scale
    ) / length**0.5


def matrix_step(student, teacher, input_ids: torch.Tensor, precision: str) -> StepResult:
    with autocast(input_ids.device, precision):
        captured = teacher.capture(input_ids, student.ssd_layers).layers
    per_layer = {}
    for idx in student.ssd_layers:
        loss = layer_matrix_loss(student.model.layers[idx], captured[idx], precision)
        backward(loss)
        per_layer[idx] = loss.detach()
    return StepResult(loss=torch.stack(list(per_layer.values())).mean(), per_layer=per_layer)
