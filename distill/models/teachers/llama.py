"""Llama-family teachers: Llama 2/3.x, SmolLM/SmolLM2, and Qwen2 (the same attention code, with q/k/v biases).

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> gated MLP -> residual), RoPE on the full head,
grouped-query attention. The student keeps all of it and swaps `self_attn`.
"""

from .family import Family

LLAMA = Family(name="llama", model_types=("llama",))
QWEN2 = Family(name="qwen2", model_types=("qwen2",))
