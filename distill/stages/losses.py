"""The stage registry: loss name -> step function, and the named trainable sets."""

from __future__ import annotations

from functools import partial

from torch import nn

from .common import StepResult  # noqa: F401  (re-exported)
from .stage1 import matrix_step
from .stage2 import hidden_step
from .stage3 import logits_step


def stage_step(stage):
    """The step function of a StageConfig: (student, teacher, input_ids, precision) -> StepResult."""
    if stage.loss == "matrix":
        return matrix_step
    if stage.loss == "hidden":
        return hidden_step
    return partial(
        logits_step,
        temperature=stage.temperature,
        ce_weight=stage.ce_weight,
        divergence=stage.divergence,
        jsd_beta=stage.jsd_beta,
        chunk_tokens=stage.chunk_tokens,
        recall_weight=stage.recall_weight,
        recall_window=stage.recall_window,
        recall_sink=stage.recall_sink,
        recall_margin=stage.recall_margin,
    )


STAGE_LOSSES = ("matrix", "hidden", "logits")


def trainable_parameters(student: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The named set of parameters a stage trains; every other parameter is frozen for that stage.

    mixers: the SSD mixers; ssd_blocks: the converted blocks whole (mixer, MLP, norms); all_but_embeddings: all but
    the token embeddings (MOHAWK's stage 3; a tied LM head shares them and stays frozen too); all: everything.
    """
    ssd = [f"model.layers.{i}." for i in student.ssd_layers]
    embeddings = student.get_input_embeddings().weight
    chosen = {}
    for name, param in student.named_parameters():
        if which == "mixers":
            take = any(name.startswith(p + "self_attn.") for p in ssd)
        elif which == "ssd_blocks":
            take = any(name.startswith(p) for p in ssd)
        elif which == "all_but_embeddings":
            take = param is not embeddings
        else:
            take = True
        if take:
            chosen[name] = param
    return chosen
