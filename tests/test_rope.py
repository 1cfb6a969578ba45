"""The rotary embedding's route to liger-kernel's fused kernel (distill/models/rope.py): liger's kernel computes
transformers' function, forward and gradients (run by Triton's interpreter off CUDA), the swapped module-level
function leaves everything but CUDA tensors to transformers' own code, and training alone swaps it."""

from __future__ import annotations

import importlib

import pytest
import torch

from distill.models import rope

liger = pytest.importorskip("liger_kernel.transformers.rope", reason="liger-kernel not installed (extras 'triton', 'test')")


def rope_inputs(g: torch.Generator, b=2, L=24, hq=4, hk=2, d=16, dtype=torch.float32):
    """q, k as Llama's attention lays them out ((b, heads, L, d) views of the projections' outputs), cos and sin."""
    q = torch.randn(b, L, hq * d, generator=g, dtype=dtype).view(b, L, hq, d).transpose(1, 2)
    k = torch.randn(b, L, hk * d, generator=g, dtype=dtype).view(b, L, hk, d).transpose(1, 2)
    angles = torch.rand(L, 1, generator=g, dtype=dtype) * torch.arange(L, dtype=dtype)[:, None] * 0.3
    angles = angles * torch.rand(d // 2, generator=g, dtype=dtype)
    emb = torch.cat((angles, angles), -1)[None]
    return q, k, emb.cos(), emb.sin()


def test_liger_rope_is_transformers_rope_with_its_gradients():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    original = getattr(apply_rotary_pos_emb, "original", apply_rotary_pos_emb)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, cos, sin = rope_inputs(g)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    outs = []
    for fn in (lambda *a: liger.liger_rotary_pos_emb(*a), original):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        rq, rk = fn(qq, kk, cos, sin)
        torch.autograd.backward((rq, rk), (dq, dk))
        outs.append((rq.detach(), rk.detach(), qq.grad, kk.grad))
    for ours, ref in zip(*outs):
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_the_swapped_function_leaves_cpu_tensors_to_transformers(model_type, monkeypatch):
    module = importlib.import_module(rope.FAMILY_MODULES[model_type])
    plain = getattr(module.apply_rotary_pos_emb, "original", module.apply_rotary_pos_emb)
    monkeypatch.setattr(module, "apply_rotary_pos_emb", plain)  # the module as it was, after the test
    assert rope.use_fused_rope(model_type) and rope.use_fused_rope(model_type)  # a second call wraps nothing again
    swapped = module.apply_rotary_pos_emb
    assert swapped.original is plain
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, cos, sin = rope_inputs(g, dtype=torch.float64)
    for got, want in zip(swapped(q, k, cos, sin), swapped.original(q, k, cos, sin)):
        assert torch.equal(got, want)
    assert rope.use_fused_rope("phi") is False  # Phi's partial rotary keeps its own


def test_training_alone_routes_the_rope(tiny_cfg, monkeypatch):
    """The trainer installs the route; loading a teacher (eval, rank, export, generate) leaves transformers' own."""
    from distill.models.teachers import load_teacher
    from distill.trainer import Trainer

    module = importlib.import_module(rope.FAMILY_MODULES["llama"])
    plain = getattr(module.apply_rotary_pos_emb, "original", module.apply_rotary_pos_emb)
    monkeypatch.setattr(module, "apply_rotary_pos_emb", plain)  # put back after the test, whatever ran before
    cfg = tiny_cfg("trainer.device=cpu")
    load_teacher(cfg.teacher)
    assert module.apply_rotary_pos_emb is plain
    Trainer(cfg)
    assert module.apply_rotary_pos_emb.original is plain
