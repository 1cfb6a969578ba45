"""SSD math: one function, several implementations.

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
    causal_conv1d,
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


def _triton_module(name: str):
    try:
        if name == "ssd":
            from . import triton_ssd as module
        elif name == "step":
            from . import triton_step as module
        else:
            from . import triton_stage1 as module
    except ImportError:
        return None
    return module


def _use_triton(t: torch.Tensor, name: str):
    """The Triton module to use for tensor `t`, or None for the PyTorch reference.

    float64 always takes the reference: the kernels compute in fp32 (tests compare them against float64).
    """
    if _backend == "torch" or (_backend == "auto" and (not t.is_cuda or t.dtype == torch.float64)):
        return None
    module = _triton_module(name)
    if module is None and _backend == "triton":
        raise RuntimeError(
            f"kernels.backend=triton but the Triton {name} kernel cannot be imported: install triton "
            "(pip install 'distill[triton]') or set kernels.backend=torch"
        )
    return module


def ssd(x, log_a, B, C, scale=None, D=None, initial_state=None, chunk_size: int = 64):
    """Chunked SSD scan (see reference.ssd_chunked for shapes); returns (y, final_state)."""
    module = _use_triton(x, "ssd")
    if module is not None:
        return module.ssd_chunked_triton(x, log_a, B, C, scale, D, initial_state, chunk_size)
    return reference.ssd_chunked(x, log_a, B, C, scale, D, initial_state, chunk_size)


def ssd_decode_step(state, x, log_a, B, C, scale=None, D=None):
    """One recurrent SSD step (see reference.ssd_step); returns (y, new_state)."""
    module = _use_triton(x, "step")
    if module is not None:
        return module.ssd_step_triton(state, x, log_a, B, C, scale, D)
    return reference.ssd_step(state, x, log_a, B, C, scale, D)


def stage1_loss(q, k, softmax_scale, log_a, B, C, scale=None):
    """MOHAWK stage-1 loss (see reference.stage1_loss); the fused kernel never builds an L x L matrix."""
    module = _use_triton(q, "stage1")
    if module is not None:
        return module.stage1_loss_triton(q, k, softmax_scale, log_a, B, C, scale)
    return reference.stage1_loss(q, k, softmax_scale, log_a, B, C, scale)
