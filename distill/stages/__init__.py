"""The three MOHAWK stages. A stage is data: a loss (this package), a trainable set and a budget (config)."""

from .losses import STAGE_LOSSES, StepResult, stage_step, trainable_parameters

__all__ = ["STAGE_LOSSES", "StepResult", "stage_step", "trainable_parameters"]
