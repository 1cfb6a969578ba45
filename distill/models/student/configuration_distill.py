"""Student configurations: the teacher family's config plus the SSD mixer's shape and the kept attention layers.

Part of the self-contained student package (copied into exports): imports only transformers and the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import LlamaConfig, PhiConfig, Qwen2Config


@dataclass
class MixerSpec:
    """Shape and form of every SSD mixer of a student (stored in the config as the dict `ssd_mixer`)."""

    n_heads: int  # h: x heads, one per teacher query head
    head_dim: int  # p: per-head width of x (the teacher's value head size)
    d_state: int  # n: width of B and C (the teacher's query/key head size)
    n_b_groups: int  # B groups (the teacher's KV heads: GQA)
    n_c_groups: int  # C groups (the teacher's query heads)
    form: str = "discrete"  # "discrete" (Phi-Mamba: a = exp(-softplus(.)), no dt on the input) or "mamba2"
    conv_kernel: int = 4
    conv_activation: str = "identity"  # "identity" (Phi-Mamba) or "silu" (Mamba-2)
    norm: bool = False  # gated RMSNorm before out_proj (Mamba-2); Phi-Mamba has none
    out_bias: bool = False
    chunk_size: int = 64

    def __post_init__(self):
        if self.form not in ("discrete", "mamba2"):
            raise ValueError(f"student.form={self.form!r}: use 'discrete' (Phi-Mamba) or 'mamba2'")
        if self.conv_activation not in ("identity", "silu"):
            raise ValueError(f"student.conv_activation={self.conv_activation!r}: use 'identity' or 'silu'")
        for name in ("n_b_groups", "n_c_groups"):
            if self.n_heads % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must divide n_heads={self.n_heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _student_config(base: type, model_type: str) -> type:
    """A subclass of the teacher family's config with the two student fields.

    transformers >= 5.x declares configs as strict dataclasses, so the fields must be declared the same way there;
    on older releases unknown keyword arguments simply become attributes.
    """
    namespace = {
        "model_type": model_type,
        "__annotations__": {"ssd_mixer": "dict | None", "attention_layers": "list | None"},
        "ssd_mixer": None,
        "attention_layers": None,
        "__module__": __name__,
    }
    cls = type(f"Distill{base.__name__}", (base,), namespace)
    if dataclasses.is_dataclass(base):
        from huggingface_hub.dataclasses import strict

        cls = strict(dataclass(cls))  # same decoration as the base classes
    return cls


DistillLlamaConfig = _student_config(LlamaConfig, "distill_llama")
DistillQwen2Config = _student_config(Qwen2Config, "distill_qwen2")
DistillPhiConfig = _student_config(PhiConfig, "distill_phi")

STUDENT_CONFIGS = {"llama": DistillLlamaConfig, "qwen2": DistillQwen2Config, "phi": DistillPhiConfig}
