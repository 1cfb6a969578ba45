"""The student as one self-contained Hugging Face-style package (exported as remote code by `distill export`)."""

from .configuration_distill import STUDENT_CONFIGS, MixerSpec
from .modeling_distill import STUDENT_CLASSES, SSDInputs, SSDMixer, StudentMixin

__all__ = ["STUDENT_CLASSES", "STUDENT_CONFIGS", "MixerSpec", "SSDInputs", "SSDMixer", "StudentMixin"]
