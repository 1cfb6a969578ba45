"""Stage losses: each one's value against an explicit computation, its gradients reach only its trainable set, and a
few optimizer steps on one batch lower it."""

import pytest
import torch
import torch.nn.functional as F

from distill.config import StageConfig, StudentConfig
from distill.models.transfer import build_student
from distill.stages import stage_step, trainable_parameters
from distill.stages.stage3 import distillation_loss


def batch(L=48):
    return torch.randint(0, 257, (2, L), generator=torch.Generator().manual_seed(torch.seed() % 2**31))


def stage(loss, **kw):
    return StageConfig(loss=loss, tokens=1024, **kw)


def test_matrix_loss_is_the_frobenius_distance(tiny_llama):
    student = build_student(tiny_llama, StudentConfig(), attention_layers=[])
    ids = batch()
    result = stage_step(stage("matrix"))(student, tiny_llama, ids, "fp32").to_floats()
    captured = tiny_llama.capture(ids, [2]).layers[2]
    with torch.no_grad():
        block = student.model.layers[2]
        M = block.self_attn.mixing_matrix(block.input_layernorm(captured.block_input))
    A = captured.attention_matrix()
    expected = (A.double() - M.double()).flatten(2).norm(dim=-1).mean() / ids.shape[1] ** 0.5
    assert abs(result.per_layer[2] - expected.item()) < 1e-5 * expected.item()
    # Normalised: an all-zero mixing matrix scores the RMS norm of the attention rows, at most 1.
    zero = (A.double().flatten(2).norm(dim=-1) / ids.shape[1] ** 0.5).mean().item()
    assert 0 < zero <= 1


def test_matrix_loss_under_bf16_takes_b_and_c_as_projected(tiny_llama, monkeypatch):
    """Under bf16 autocast B and C reach the fused loss in bf16 (the kernel's tensor-core products; upcast, they
    went through 3xTF32 and stage 1 ran slowest), and the loss is the float64 distance of those bf16 values."""
    from distill import kernels
    from distill.kernels import reference

    seen = []
    original = kernels.stage1_loss

    def spy(*args):
        seen.append(args)
        return original(*args)

    monkeypatch.setattr(kernels, "stage1_loss", spy)
    student = build_student(tiny_llama, StudentConfig(), attention_layers=[])
    ids = batch()
    result = stage_step(stage("matrix"))(student, tiny_llama, ids, "bf16").to_floats()
    assert len(seen) == len(student.ssd_layers)
    q, k, softmax_scale, log_a, B, C, scale = seen[-1]
    assert B.dtype == C.dtype == torch.bfloat16 and B.requires_grad
    wide = [None if t is None else t.detach().double() for t in (q, k, log_a, B, C, scale)]
    expected = reference.stage1_loss(wide[0], wide[1], softmax_scale, *wide[2:]) / ids.shape[1] ** 0.5
    layer = student.ssd_layers[-1]
    assert abs(result.per_layer[layer] - expected.item()) < 1e-4 * expected.item()


def test_hidden_loss_is_the_block_output_distance(tiny_phi):
    student = build_student(tiny_phi, StudentConfig(form="mamba2"), attention_layers=[])
    ids = batch()
    result = stage_step(stage("hidden"))(student, tiny_phi, ids, "fp32").to_floats()
    captured = tiny_phi.capture(ids, [1]).layers[1]
    with torch.no_grad():
        out = student.model.layers[1](captured.block_input)
    target = captured.block_output.double()
    expected = ((out.double() - target).flatten(1).norm(dim=-1) / target.flatten(1).norm(dim=-1)).mean()
    assert abs(result.per_layer[1] - expected.item()) < 1e-5 * expected.item()


def test_distillation_loss_against_float64():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    T = 2.0
    loss, parts = distillation_loss(s, t, T, labels, ce_weight=0.5)
    p = F.softmax(t.double() / T, -1)
    kl = (p * (p.log() - F.log_softmax(s.double() / T, -1))).sum(-1).mean() * T * T
    ce = F.cross_entropy(s.double().flatten(0, 1), labels.flatten())
    assert abs(loss.item() - (kl + 0.5 * ce).item()) < 1e-5 * (kl + 0.5 * ce).item()
    assert abs(parts["kl"] - kl.item()) < 1e-5 * kl.item()
    assert distillation_loss(t, t, T)[0].abs().item() < 1e-6  # zero when the student matches


@pytest.mark.parametrize(
    "loss, trainable",
    [("matrix", "mixers"), ("hidden", "ssd_blocks"), ("logits", "all_but_embeddings")],
)
def test_steps_lower_the_loss_and_touch_only_the_trainable_set(tiny_llama, loss, trainable):
    student = build_student(tiny_llama, StudentConfig(), attention_layers=[1])
    params = trainable_parameters(student, trainable)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if n not in params}
    optimizer = torch.optim.Adam(params.values(), lr=3e-3)
    step, ids = stage_step(stage(loss)), batch()
    history = []
    for _ in range(6):
        optimizer.zero_grad()
        history.append(step(student, tiny_llama, ids, "fp32").to_floats().loss)
        optimizer.step()
    assert history[-1] < 0.9 * history[0], history
    for name, before in frozen.items():
        assert torch.equal(before, dict(student.named_parameters())[name]), f"{name} changed but is not trainable"
    names = set(params)
    if trainable == "mixers":
        assert names and all(".self_attn." in n and not n.startswith("model.layers.1.") for n in names)
    if trainable == "ssd_blocks":
        assert any(".mlp." in n for n in names) and not any(n.startswith("model.layers.1.") for n in names)
    if trainable == "all_but_embeddings":
        assert "model.embed_tokens.weight" not in names and "model.layers.1.self_attn.q_proj.weight" in names
