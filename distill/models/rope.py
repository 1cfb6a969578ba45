"""The Llama family's rotary embedding on CUDA through liger-kernel's fused kernel, where liger-kernel is installed.

Why: transformers applies the rotary embedding as about ten eager elementwise passes over q and k in every attention
layer (rotate_half's two slices, neg and cat, then two products and a sum, for each of q and k); in stage 3 the
teacher's 30 layers spent about 10 ms of a 205 ms step on them (H200 profile of 2026-12-04,
bench/runs/profile_stage3_2026-12-04.md). liger-kernel's rope is one pass. The project prefers a well-kept library
to a twin of its own: bench/liger_compare.py times liger's rope against the eager one.

transformers' attention calls the module-level `apply_rotary_pos_emb` of its family's modeling file, so that name is
swapped, once a process, for the function `_dispatch` builds: CUDA tensors go to liger's kernel, everything else (CPU
models, float64 tests, `kernels=torch`) to transformers' own function, unchanged. The trainer alone installs it (the
same function up to bf16 rounding: liger rounds once, eager after each pass); `distill eval`, `rank`, `export` and
`generate` keep transformers' arithmetic, so that a student's scores are those an independent harness computes.
"""

from __future__ import annotations

import importlib
import logging

import torch

from .. import kernels

# model_type -> the modeling module whose attention calls `apply_rotary_pos_emb`
FAMILY_MODULES = {"llama": "transformers.models.llama.modeling_llama", "qwen2": "transformers.models.qwen2.modeling_qwen2"}


def _liger_rope():
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None
    # liger looks for its optional backends (CuTe DSL, Ascend) on a kernel's first call and warns for each one not
    # installed; its Triton kernel, the one used here, needs neither.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    return liger_rotary_pos_emb


def _dispatch(original, fused):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # transformers 5's signature
        if q.is_cuda and q.dtype != torch.float64 and kernels.get_backend() != "torch":
            return fused(q, k, cos, sin, None, unsqueeze_dim)  # liger's 5th argument is position_ids (unused)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.original = original  # what bench/train_throughput.py --ablate rope puts back
    return apply_rotary_pos_emb


def use_fused_rope(model_type: str) -> bool:
    """Route the family's rotary embedding through liger's kernel on CUDA; False where liger-kernel is not installed
    or the family has no such module-level function (Phi's partial rotary keeps its own)."""
    name = FAMILY_MODULES.get(model_type)
    fused = _liger_rope()
    if name is None or fused is None:
        return False
    module = importlib.import_module(name)
    if not hasattr(module.apply_rotary_pos_emb, "original"):
        module.apply_rotary_pos_emb = _dispatch(module.apply_rotary_pos_emb, fused)
    return True
