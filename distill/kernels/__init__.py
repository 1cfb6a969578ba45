"""SSD math (and the block's RMSNorm and SwiGLU gate, and stage 3's chunk divergence): one function, several
implementations.

`reference.py` is the plain-PyTorch definition (naive loop, materialised matrix, chunked scan, one-token step);
the Triton files beside it are the fused GPU kernels with the same signatures. The functions exported here pick the
implementation: Triton for CUDA tensors when triton is importable, the PyTorch reference otherwise.
`set_backend("torch" | "triton" | "auto")` forces a choice (config: `kernels.backend`).

Only relative imports in this folder: `distill export` copies these files beside an exported model's modeling code.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import (  # noqa: F401  (re-exported: the math is part of the public API)
    attention_matrix,
    causal_conv1d_step,
    ssd_chunked,
    ssd_materialized,
    ssd_matrix,
    ssd_naive,
    ssd_step,
)

_BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the kernel implementation: "auto" (Triton on CUDA, else PyTorch), "torch" or "triton"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernels.backend={name!r} is not one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def _triton_function(name: str):
    """The Triton kernel `name` ("ssd", "step", "stage1", "conv", "rms_norm", "swiglu", "divergence"), or None
    where triton cannot be imported.

    Written as `from .module import function`: transformers finds an exported model's relative imports by that
    pattern and copies those files beside it, so an export keeps its GPU kernels.
    """
    try:
        if name == "ssd":
            from .triton_ssd import ssd_chunked_triton as kernel
        elif name == "step":
            from .triton_step import ssd_step_triton as kernel
        elif name == "conv":
            from .triton_conv import causal_conv1d_triton as kernel
        elif name == "rms_norm":
            from .triton_rmsnorm import rms_norm_triton as kernel
        elif name == "swiglu":
            from .triton_swiglu import swiglu_triton as kernel
        elif name == "divergence":
            from .triton_divergence import chunk_divergence_triton as kernel
        else:
            from .triton_stage1 import stage1_loss_triton as kernel
    except ImportError:
        return None
    return kernel


def _use_triton(t: torch.Tensor, name: str):
    """The Triton kernel to use for tensor `t`, or None for the PyTorch reference.

    float64 always takes the reference: the kernels compute in fp32 (tests compare them against float64).
    """
    if _backend == "torch" or (_backend == "auto" and (not t.is_cuda or t.dtype == torch.float64)):
        return None
    kernel = _triton_function(name)
    if kernel is None and _backend == "triton":
        raise RuntimeError(
            f"kernels.backend=triton but the Triton {name} kernel cannot be imported: install triton "
            "(pip install 'distill[triton]') or set kernels.backend=torch"
        )
    return kernel


def ssd(x, log_a, B, C, scale=None, D=None, initial_state=None, chunk_size: int = 64):
    """Chunked SSD scan (see reference.ssd_chunked for shapes); returns (y, final_state)."""
    kernel = _use_triton(x, "ssd")
    if kernel is not None:
        return kernel(x, log_a, B, C, scale, D, initial_state, chunk_size)
    return reference.ssd_chunked(x, log_a, B, C, scale, D, initial_state, chunk_size)


def causal_conv1d(x, weight, bias=None, initial_state=None):
    """Depthwise causal conv (see reference.causal_conv1d); returns (y, final_state). The Triton kernel where no
    initial state is given (training, a cache's first prefill); a cached conv continues through the reference."""
    kernel = _use_triton(x, "conv") if initial_state is None else None
    if kernel is not None:
        return kernel(x, weight, bias)
    return reference.causal_conv1d(x, weight, bias, initial_state)


def ssd_decode_step(state, x, log_a, B, C, scale=None, D=None):
    """One recurrent SSD step (see reference.ssd_step); returns (y, new_state)."""
    kernel = _use_triton(x, "step")
    if kernel is not None:
        return kernel(state, x, log_a, B, C, scale, D)
    return reference.ssd_step(state, x, log_a, B, C, scale, D)


def stage1_loss(q, k, softmax_scale, log_a, B, C, scale=None):
    """MOHAWK stage-1 loss (see reference.stage1_loss); the fused kernel never builds an L x L matrix."""
    kernel = _use_triton(q, "stage1")
    if kernel is not None:
        return kernel(q, k, softmax_scale, log_a, B, C, scale)
    return reference.stage1_loss(q, k, softmax_scale, log_a, B, C, scale)


def rms_norm(x, weight, eps: float, out_dtype=None):
    """The Llama family's RMSNorm, weight * normalize(x), optionally rounded to `out_dtype` (see
    reference.rms_norm)."""
    kernel = _use_triton(x, "rms_norm")
    if kernel is not None:
        return kernel(x, weight, eps, out_dtype)
    return reference.rms_norm(x, weight, eps, out_dtype)


def swiglu(gate, up):
    """silu(gate) * up, the gated MLP's activation (see reference.swiglu)."""
    kernel = _use_triton(gate, "swiglu")
    if kernel is not None:
        return kernel(gate, up)
    return reference.swiglu(gate, up)


def chunk_divergence(student_logits, teacher_logits, divergence="forward_kl", beta=0.5, temperature=1.0,
                     kl_scale=1.0, labels=None, ce_scale=0.0, grad_dtype=None, weights=None):
    """Stage 3 on a chunk of logits: (divergence sum, cross-entropy sum or None, gradient for the student logits);
    see reference.chunk_divergence. The kernel computes every divergence the reference knows (forward and reverse
    KL, the generalized JSD)."""
    kernel = _use_triton(student_logits, "divergence")
    if kernel is not None:
        return kernel(student_logits, teacher_logits, divergence, beta, temperature, kl_scale, labels, ce_scale,
                      grad_dtype, weights=weights)
    return reference.chunk_divergence(student_logits, teacher_logits, divergence, beta, temperature, kl_scale,
                                      labels, ce_scale, grad_dtype, weights)
