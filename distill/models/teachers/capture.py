"""One teacher forward, everything stages 1 and 2 need: per layer the block input, the block output, Q and K.

Q and K are taken after RoPE (partial RoPE for Phi) by a registered attention function that records what the
teacher's own attention code hands it and then runs SDPA, so the teacher's output is unchanged and no attention
weights are ever asked of transformers (its SDPA path returns none). Attention matrices are made lazily from Q and K,
one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...kernels import attention_matrix

CAPTURE_IMPLEMENTATION = "distill_capture"


@dataclass
class LayerCapture:
    """What one teacher layer saw and did on one batch. Shapes in the kernel layout (batch, length, heads, dim)."""

    block_input: torch.Tensor | None = None  # (b, L, d_model)
    block_output: torch.Tensor | None = None  # (b, L, d_model)
    q: torch.Tensor | None = None  # (b, L, h, d), after RoPE
    k: torch.Tensor | None = None  # (b, L, hk, d), after RoPE
    softmax_scale: float = 1.0

    def attention_matrix(self) -> torch.Tensor:
        """softmax(q k^T * scale + causal mask), (b, h, L, L) in float32: made on demand, never stored."""
        return attention_matrix(self.q, self.k, self.softmax_scale)


@dataclass
class TeacherPass:
    logits: torch.Tensor | None
    layers: dict[int, LayerCapture] = field(default_factory=dict)


# The layers being recorded by the forward in progress (None: no capture, plain SDPA).
_recording: dict[int, LayerCapture] | None = None


def _capture_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    if _recording is not None and module.layer_idx in _recording:
        record = _recording[module.layer_idx]
        record.q = query.transpose(1, 2).detach()
        record.k = key.transpose(1, 2).detach()
        record.softmax_scale = float(kwargs.get("scaling") or query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


def use_capture_attention(model: nn.Module) -> None:
    """Route the model's attention through the recorder (SDPA underneath)."""
    try:
        model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    except (ValueError, AttributeError):
        model.config._attn_implementation = CAPTURE_IMPLEMENTATION


@torch.no_grad()
def capture_layers(model: nn.Module, input_ids: torch.Tensor, layers: list[int], logits: bool = False) -> TeacherPass:
    """Run `model` once on `input_ids`, recording block inputs/outputs and Q/K of `layers`."""
    global _recording
    records = {i: LayerCapture() for i in layers}
    decoder_layers = model.model.layers

    def save_input(idx):
        def hook(module, args, kwargs):
            records[idx].block_input = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def save_output(idx):
        def hook(module, args, kwargs, output):
            records[idx].block_output = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    hooks = []
    for i in layers:
        hooks.append(decoder_layers[i].register_forward_pre_hook(save_input(i), with_kwargs=True))
        hooks.append(decoder_layers[i].register_forward_hook(save_output(i), with_kwargs=True))
    _recording = records
    try:
        if logits:
            out = model(input_ids=input_ids, use_cache=False).logits
        else:  # stages 1-2 need no logits: skip the LM head (the largest matmul of a small model)
            model.model(input_ids=input_ids, use_cache=False)
            out = None
    finally:
        _recording = None
        for hook in hooks:
            hook.remove()
    return TeacherPass(logits=out, layers=records)
