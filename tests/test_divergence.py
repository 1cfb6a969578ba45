"""Stage 3's fused, chunked divergence against the full-logits definition in float64: value and every gradient."""

from __future__ import annotations

import pytest
import torch

from distill.config import StageConfig, StudentConfig
from distill.models.transfer import build_student
from distill.stages import stage_step
from distill.stages.divergence import divergence_reference, fused_linear_divergence
from distill.stages.stage3 import distillation_loss


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _case(n=37, H=16, V=53, bias=True):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    s_hidden = torch.randn(n, H, generator=g)
    t_hidden = torch.randn(n, H, generator=g)
    s_head, t_head = torch.nn.Linear(H, V, bias=bias), torch.nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        for head in (s_head, t_head):
            head.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
            if bias:
                head.bias.copy_(torch.randn(V, generator=g))
    labels = torch.randint(0, V, (n,), generator=g)
    return s_hidden, s_head, t_hidden, t_head, labels


@pytest.mark.parametrize(
    "divergence, backend",
    [("forward_kl", "auto"), ("reverse_kl", "auto"), ("jsd", "auto"),
     # the chunk's divergence through the Triton kernel (Triton's interpreter on a CPU)
     ("forward_kl", "triton"), ("reverse_kl", "triton"), ("jsd", "triton")],
)
@pytest.mark.parametrize("bias, weighted", [(True, False), (False, False), (True, True)])
def test_fused_matches_float64_reference(divergence, backend, bias, weighted, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        from distill import kernels

        monkeypatch.setattr(kernels, "_backend", "triton")
    s_hidden, s_head, t_hidden, t_head, labels = _case(bias=bias)
    T, beta, ce_weight = 1.7, 0.3, 0.4
    # Per-token weights (recall weighting): fresh, positive, some rows far above the others.
    weights = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(torch.seed() % 2**31)) ** 3 * 4 \
        if weighted else None
    # Reference: full logits, float64, autograd.
    h64 = s_hidden.double().requires_grad_()
    w64 = s_head.weight.detach().double().requires_grad_()
    b64 = s_head.bias.detach().double().requires_grad_() if bias else None
    s_logits = h64 @ w64.t() + (b64 if bias else 0)
    t_logits = t_hidden.double() @ t_head.weight.detach().double().t() + (t_head.bias.detach().double() if bias else 0)
    ref, ref_parts = divergence_reference(s_logits, t_logits, divergence, T, beta, labels, ce_weight,
                                          weights.double() if weighted else None)
    ref.backward()
    # Fused: chunks of 8 (37 tokens: the last chunk is short); the Triton backend on the GPU where there is one
    # (compiled kernels take CUDA tensors), else under Triton's interpreter.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    s_head, t_head = s_head.to(device), t_head.to(device)
    hidden = s_hidden.to(device).requires_grad_()
    loss, parts = fused_linear_divergence(hidden, s_head, t_hidden.to(device), t_head, divergence, T, beta,
                                          labels.to(device), ce_weight, chunk_tokens=8,
                                          weights=weights.to(device) if weighted else None)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert abs(parts[divergence].item() - ref_parts[divergence].item()) < 1e-5 * ref_parts[divergence].item()
    assert abs(parts["ce"].item() - ref_parts["ce"].item()) < 1e-5 * ref_parts["ce"].item()
    assert _rel(hidden.grad, h64.grad) < 1e-5
    assert _rel(s_head.weight.grad, w64.grad) < 1e-5
    if bias:
        assert _rel(s_head.bias.grad, b64.grad) < 1e-5
    assert t_head.weight.grad is None  # the teacher gets nothing


def test_divergences_vanish_at_the_teacher_and_order_sensibly():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    t = torch.randn(20, 31, generator=g, dtype=torch.float64)
    s = torch.randn(20, 31, generator=g, dtype=torch.float64)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence_reference(t, t, divergence)[0].abs().item() < 1e-12
        assert divergence_reference(s, t, divergence)[0].item() > 0
    # The symmetric JSD is bounded by log 2 and symmetric in its arguments.
    jsd = divergence_reference(s, t, "jsd", beta=0.5)[0].item()
    assert jsd < torch.log(torch.tensor(2.0)).item()
    assert abs(jsd - divergence_reference(t, s, "jsd", beta=0.5)[0].item()) < 1e-12
    # Reverse KL is forward KL with the roles swapped.
    assert abs(divergence_reference(s, t, "reverse_kl")[0].item() - divergence_reference(t, s)[0].item()) < 1e-12


def test_frozen_head_gets_no_gradient_and_memory_stays_chunked():
    s_hidden, s_head, t_hidden, t_head, labels = _case(n=64, V=101)
    s_head.requires_grad_(False)
    hidden = s_hidden.clone().requires_grad_()
    shapes = []
    original = torch.matmul

    def spy(a, b, *args, **kwargs):
        out = original(a, b, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    torch.matmul = spy
    try:
        loss, _ = fused_linear_divergence(hidden, s_head, t_hidden, t_head, chunk_tokens=16)
        loss.backward()
    finally:
        torch.matmul = original
    assert s_head.weight.grad is None and hidden.grad is not None
    # No (64, 101) logits anywhere: every vocabulary-wide product is one chunk of 16 tokens.
    assert max(s[0] for s in shapes if s[-1] == 101) == 16


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_logits_step_equals_full_logits_reference(tiny_teacher, divergence):
    student = build_student(tiny_teacher, StudentConfig(), attention_layers=[1])
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    cfg = StageConfig(loss="logits", tokens=80, divergence=divergence, temperature=2.0, ce_weight=0.3, chunk_tokens=13)
    student.zero_grad()
    result = stage_step(cfg)(student, tiny_teacher, ids, "fp32").to_floats()
    fused = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    t_logits = tiny_teacher.logits(ids)[:, :-1]
    loss, _ = distillation_loss(s_logits, t_logits, 2.0, ids[:, 1:], 0.3, divergence=divergence)
    loss.backward()
    assert abs(result.loss - loss.item()) < 1e-5 * loss.item()
    for name, p in student.named_parameters():
        if p.grad is not None and p.grad.norm() > 0:
            assert _rel(fused[name], p.grad) < 1e-4, name


def test_weighted_reference_is_each_tokens_divergence_times_its_weight():
    """divergence_reference's weights: all ones change nothing; one row weighted alone gives that row's divergence
    (times its weight, over the token count), so the fused tests above compare against the right definition."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    s = torch.randn(2, 5, 31, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 31, generator=g, dtype=torch.float64)
    plain, _ = divergence_reference(s, t, "forward_kl", 1.3)
    ones, _ = divergence_reference(s, t, "forward_kl", 1.3, weights=torch.ones(2, 5, dtype=torch.float64))
    assert abs(ones.item() - plain.item()) < 1e-12 * plain.item()
    only = torch.zeros(2, 5, dtype=torch.float64)
    only[1, 3] = 2.5
    one_row, _ = divergence_reference(s, t, "forward_kl", 1.3, weights=only)
    alone, _ = divergence_reference(s[1, 3:4], t[1, 3:4], "forward_kl", 1.3)
    assert abs(one_row.item() - 2.5 * alone.item() / 10) < 1e-12 * alone.item()
