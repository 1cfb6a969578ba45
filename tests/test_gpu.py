"""On CUDA, the fused Triton path and the PyTorch reference give the same stage losses and gradients.

Skipped without CUDA (CI has none); run on the GPU machine: `python -m pytest -q tests/test_gpu.py`.
"""

import copy
import json
import math

import pytest
import torch

from distill import kernels
from distill.config import StageConfig, StudentConfig
from distill.models.transfer import build_student
from distill.stages import stage_step, trainable_parameters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run_step(student, teacher, ids, loss, backend, divergence="forward_kl"):
    kernels.set_backend(backend)
    try:
        student.zero_grad(set_to_none=True)
        params = trainable_parameters(student, {"matrix": "mixers", "logits": "all_but_embeddings"}[loss])
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        jsd = {"jsd_beta": 0.3, "temperature": 2.0} if divergence == "jsd" else {}
        cfg = StageConfig(loss=loss, tokens=1, divergence=divergence, **jsd)
        result = stage_step(cfg)(student, teacher, ids, "fp32").to_floats()
        return result, {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    finally:
        kernels.set_backend("auto")


@pytest.mark.parametrize("loss", ["matrix", "logits", "logits_jsd"])
@pytest.mark.parametrize("form", ["discrete", "mamba2"])
@pytest.mark.parametrize("d_state", [0, 24])
def test_fused_path_matches_reference(tiny_llama, loss, form, d_state):
    """logits_jsd: stage 3 with the generalized JSD (beta 0.3, T = 2), which the divergence kernel computes too.
    d_state 24: a state larger than the head (16) and not a power of two (stage 1's kernel pads it)."""
    loss, divergence = ("logits", "jsd") if loss == "logits_jsd" else (loss, "forward_kl")
    teacher = tiny_llama.to("cuda")
    student = build_student(teacher, StudentConfig(form=form, d_state=d_state), attention_layers=[1]).cuda()
    with torch.no_grad():  # open the gates so stage 3 sees the SSD layers
        for i in student.ssd_layers:
            student.mixer(i).in_proj.bias[: student.mixer(i).x_width].fill_(1.0)
    ids = torch.randint(0, 257, (2, 200), device="cuda")  # several chunks, not a multiple of 64
    fused, fused_grads = run_step(student, teacher, ids, loss, "triton", divergence)
    ref, ref_grads = run_step(student, teacher, ids, loss, "torch", divergence)
    assert abs(fused.loss - ref.loss) <= 2e-3 * abs(ref.loss)
    assert fused_grads.keys() == ref_grads.keys() and fused_grads
    for name, g in ref_grads.items():
        err = (fused_grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-2, (name, err.item())
    tiny_llama.to("cpu")


def _stage_setup(student, loss):
    params = trainable_parameters(student, {"matrix": "mixers", "hidden": "ssd_blocks", "logits": "all_but_embeddings"}[loss])
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


@pytest.mark.parametrize("loss", ["matrix", "hidden", "logits", "logits_recall"])
def test_captured_step_equals_eager_step(tiny_llama, loss):
    """Five scheduled steps replayed from one CUDA graph give the eager trainer's losses, gradient norms and
    weights; the warm-up before the capture leaves no trace. logits_recall: stage 3 with recall weights, computed
    inside the graph from each batch by the windowed teacher."""
    recall = loss == "logits_recall"
    loss = "logits" if recall else loss
    from distill.graph_step import capture_step, lambda_schedule, make_adamw

    teacher = tiny_llama.to("cuda")
    base = build_student(teacher, StudentConfig(form="discrete"), attention_layers=[1]).cuda()
    with torch.no_grad():  # open the gates so every stage sees the SSD layers
        for i in base.ssd_layers:
            base.mixer(i).in_proj.bias[: base.mixer(i).x_width].fill_(1.0)
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    batches = [torch.randint(0, 257, (2, 160), device="cuda", generator=g) for _ in range(5)]
    # Recall weighting with margin 0: about half the positions (those the windowed teacher is less sure of), which
    # differ from batch to batch, so the graph must compute them from each batch.
    step = stage_step(StageConfig(loss=loss, tokens=1, recall_weight=3.0 if recall else 0.0, recall_window=16,
                                  recall_margin=0.0))
    runs = {}
    for graphs in (False, True):
        student = copy.deepcopy(base)
        params = _stage_setup(student, loss)
        opt = make_adamw(params, 3e-3, 0.01, torch.device("cuda"), graphs=graphs)
        sched = lambda_schedule(opt, lambda s: 1.0 / (1 + s))
        captured = None
        if graphs:
            captured, why = capture_step(step, student, teacher, params, opt, 1.0, "bf16", batches[0])
            assert captured is not None, why
        losses, norms = [], []
        for batch in batches:
            if captured is not None:
                result, norm = captured(batch)
                result = result.to_floats()
            else:
                opt.zero_grad(set_to_none=True)
                result = step(student, teacher, batch, "bf16").to_floats()
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            sched.step()
            losses.append(result.loss)
            norms.append(float(norm))
        runs[graphs] = (losses, norms, [p.detach().clone() for p in params])
    (l0, n0, w0), (l1, n1, w1) = runs[False], runs[True]
    for a, b in zip(l0, l1):
        assert abs(a - b) <= 2e-3 * abs(a), (l0, l1)
    # Gradient norms of bf16 gradients: 2.2e-3 apart seen on an H200 (stage 3), within bf16's rounding (3.9e-3).
    for a, b in zip(n0, n1):
        assert abs(a - b) <= 5e-3 * abs(a), (n0, n1)
    initial = [p.detach() for p in _stage_setup(base, loss)]
    for a, b, w in zip(w0, w1, initial):  # every parameter the eager steps moved, the replays moved too
        assert (b - w).norm() > 0 or (a - w).norm() == 0
    # Weights agree less tightly than losses: Adam's update has size ~lr whatever the gradient's size, so bf16
    # rounding in near-zero gradients moves them (5.8e-3 seen on an H200 in stage 3, fused vs foreach AdamW); a small
    # parameter made mostly of such moves (one that starts at zero, as D does) can differ far more: one parameter
    # failed a per-parameter 2e-2 on an H200 (2026-12-03, stage 3). So the weights are compared together.
    diff = sum((a - b).double().pow(2).sum() for a, b in zip(w0, w1)).sqrt()
    assert (diff / sum(a.double().pow(2).sum() for a in w0).sqrt()).item() < 2e-2
    tiny_llama.to("cpu")


def test_a_non_finite_captured_step_leaves_the_weights(tiny_llama):
    from distill.graph_step import capture_step, make_adamw

    teacher = tiny_llama.to("cuda")
    student = build_student(teacher, StudentConfig(form="discrete"), attention_layers=[]).cuda()
    params = _stage_setup(student, "matrix")
    opt = make_adamw(params, 1e-2, 0.0, torch.device("cuda"), graphs=True)
    ids = torch.randint(0, 257, (2, 128), device="cuda")
    step = stage_step(StageConfig(loss="matrix", tokens=1))
    captured, why = capture_step(step, student, teacher, params, opt, 1.0, "fp32", ids)
    assert captured is not None, why
    assert math.isfinite(captured(ids)[0].to_floats().loss)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        student.mixer(0).decay_bias.fill_(float("nan"))  # a NaN inside the step
    before[[i for i, p in enumerate(params) if p is student.mixer(0).decay_bias][0]].fill_(float("nan"))
    result = captured(ids)[0].to_floats()
    assert not math.isfinite(result.loss)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b) or (torch.isnan(p).all() and torch.isnan(b).all())
    tiny_llama.to("cpu")


def test_train_on_cuda_captures_every_stage(tmp_path, capsys):
    """`distill train` on CUDA captures each stage's step (no eager fallback) and trains as the eager run does."""
    from distill.cli import main

    losses = {}
    for graphs in ("false", "true"):
        run = tmp_path / graphs
        assert main(["train", "experiment=tiny", "trainer.device=cuda", f"trainer.cuda_graphs={graphs}",
                     f"run_dir={run}"]) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[graphs] = [r["loss"] for r in rows if "step" in r]
    assert "runs eagerly" not in capsys.readouterr().out
    assert len(losses["true"]) == len(losses["false"]) == 24
    for a, b in zip(losses["false"], losses["true"]):
        assert abs(a - b) <= 2e-2 * abs(a), (losses["false"], losses["true"])
