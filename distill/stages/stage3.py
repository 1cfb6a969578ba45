"""Stage 3, end-to-end: KL(teacher || student) on next-token distributions at temperature T (scaled by T^2, as in
Hinton et al.), plus an optional cross-entropy weight on the true next tokens. Computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import StepResult, autocast


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over tokens of T^2 KL(softmax(t/T) || softmax(s/T)) (+ ce_weight * CE(s, labels)); logits (..., V)."""
    s = student_logits.float().flatten(0, -2)
    t = teacher_logits.float().flatten(0, -2)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2
    parts = {"kl": kl.item()}
    loss = kl
    if ce_weight and labels is not None:
        ce = F.cross_entropy(s, labels.flatten())
        parts["ce"] = ce.item()
        loss = loss + ce_weight * ce
    return loss, parts


def logits_step(student, teacher, input_ids: torch.Tensor, precision: str, temperature: float, ce_weight: float):
    with autocast(input_ids.device, precision):
        teacher_logits = teacher.logits(input_ids)
        student_logits = student(input_ids=input_ids, use_cache=False).logits
    # Predict token t+1 from position t: the last position has no label, drop it from both.
    loss, parts = distillation_loss(
        student_logits[:, :-1], teacher_logits[:, :-1], temperature, input_ids[:, 1:], ce_weight
    )
    loss.backward()
    return StepResult(loss=loss.item(), extra=parts)
