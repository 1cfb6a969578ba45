"""Stage 3, end-to-end: the student's next-token distribution against the teacher's (forward KL, reverse KL or
generalized JSD at temperature T, scaled by T^2), plus an optional cross-entropy weight on the true next tokens;
optionally weighted towards the positions where the teacher needs far context (distill/recall.py).

The vocabulary-sized logits are never built whole: the loss is computed in token chunks from both models' final
hidden states and LM heads (divergence.py), in float32 per chunk.
"""

from __future__ import annotations

import torch

from ..recall import recall_positions, recall_weights
from .common import StepResult, autocast, backward
from .divergence import divergence_reference, fused_linear_divergence


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage-3 loss on full logits (..., V): the reference the fused path is tested against."""
    loss, parts = divergence_reference(student_logits, teacher_logits, divergence, temperature, beta, labels, ce_weight)
    return loss, {("kl" if k == "forward_kl" else k): v.item() for k, v in parts.items()}


def logits_step(
    student,
    teacher,
    input_ids: torch.Tensor,
    precision: str,
    temperature: float,
    ce_weight: float,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    chunk_tokens: int = 1024,
    recall_weight: float = 0.0,
    recall_window: int = 16,
    recall_sink: int = 4,
    recall_margin: float = 1.0,
) -> StepResult:
    extra = {}
    weights = None
    matmul_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with autocast(input_ids.device, precision):
        teacher_hidden = teacher.final_hidden(input_ids)
        if recall_weight:  # where the teacher needs far context weighs more (distill/recall.py); the share is logged
            positions = recall_positions(teacher, input_ids, teacher_hidden, recall_window, recall_sink,
                                         recall_margin, matmul_dtype)
            weights, extra["recall_share"] = recall_weights(positions, recall_weight)
        student_hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
    # Predict token t+1 from position t: the last position has no label, drop it from both.
    loss, parts = fused_linear_divergence(
        student_hidden[:, :-1].flatten(0, 1),
        student.lm_head,
        teacher_hidden[:, :-1].flatten(0, 1),
        teacher.lm_head,
        divergence=divergence,
        temperature=temperature,
        beta=jsd_beta,
        labels=input_ids[:, 1:].flatten(),
        ce_weight=ce_weight,
        chunk_tokens=chunk_tokens,
        matmul_dtype=matmul_dtype,
        weights=weights,
    )
    backward(loss)
    extra.update({("kl" if k == "forward_kl" else k): v for k, v in parts.items()})
    return StepResult(loss=loss.detach(), extra=extra)
