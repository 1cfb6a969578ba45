"""What distill needs to know about a teacher architecture: where its attention projections live."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """A Hugging Face decoder family whose layers are `model.model.layers[i]` with `self_attn` and `mlp`."""

    name: str  # key of the student class in distill.models.student.STUDENT_CLASSES
    model_types: tuple[str, ...]  # config.model_type values this family covers
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    block: str = "sequential"  # "sequential" (pre-norm attention then MLP) or "parallel" (attention + MLP, Phi)
