"""Recall weighting in stage 3 (stages.stage3.recall_weight): which positions are recall positions, the weights, the
step's loss against the full-logits definition with the same weights, and a run that logs their share."""

from __future__ import annotations

import json

import pytest
import torch

from distill.cli import main
from distill.config import StageConfig, StudentConfig
from distill.models.transfer import build_student
from distill.recall import recall_positions, recall_weights
from distill.stages import stage_step
from distill.stages.stage3 import distillation_loss


def _ids(b, L, vocab):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return torch.randint(0, vocab, (b, L), generator=g)


@pytest.mark.parametrize("window", [1, 3, 7])
def test_recall_positions_equal_a_loop_over_positions(window):
    ids = _ids(3, 40, 12)  # a small vocabulary: tokens recur near and far
    got = recall_positions(ids, window)
    assert got.shape == (3, 39)
    for b in range(3):
        for t in range(39):
            nxt = ids[b, t + 1].item()
            far = any(ids[b, j].item() == nxt for j in range(0, t - window + 1))
            near = any(ids[b, j].item() == nxt for j in range(max(0, t - window + 1), t + 1))
            assert got[b, t].item() == (far and not near), (b, t)
    assert 0 < got.float().mean() < 1  # both kinds present: the test can fail either way
    with pytest.raises(ValueError, match="window=0"):
        recall_positions(ids, 0)


def test_recall_weights_have_mean_one_and_the_ratio_asked_for():
    ids = _ids(2, 64, 20)
    weights, share = recall_weights(ids, 3.0, 4)
    recall = recall_positions(ids, 4).flatten()
    assert weights.shape == (2 * 63,)
    assert abs(weights.mean().item() - 1) < 1e-6
    assert abs(share.item() - recall.float().mean().item()) < 1e-7
    assert torch.allclose(weights[recall] / weights[~recall][0], torch.full((int(recall.sum()),), 4.0))


def test_a_weighted_step_equals_the_full_logits_reference_with_the_same_weights(tiny_teacher):
    student = build_student(tiny_teacher, StudentConfig(), attention_layers=[1])
    ids = _ids(2, 40, 30)  # tokens of 30 of the 257: recall positions occur
    cfg = StageConfig(loss="logits", tokens=80, temperature=1.5, chunk_tokens=13, recall_weight=10.0, recall_window=5)
    student.zero_grad()
    result = stage_step(cfg)(student, tiny_teacher, ids, "fp32").to_floats()
    fused = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1].double()
    t_logits = tiny_teacher.logits(ids)[:, :-1].double()
    weights, share = recall_weights(ids, 10.0, 5)
    from distill.stages.divergence import divergence_reference

    loss, _ = divergence_reference(s_logits, t_logits, "forward_kl", 1.5, weights=weights.double().view(2, 39))
    loss.backward()
    plain, _ = distillation_loss(s_logits.detach(), t_logits, 1.5)
    assert abs(result.loss - loss.item()) < 1e-4 * loss.item()  # a float32 step: KL of near logits cancels
    assert abs(result.loss - plain.item()) > 1e-3 * plain.item()  # weights changed it (>= 0.6% in 200 draws)  # the weights changed the loss
    assert result.extra["recall_share"] == pytest.approx(share.item())
    for name, p in student.named_parameters():
        if p.grad is not None and p.grad.norm() > 0:
            assert ((fused[name] - p.grad).norm() / p.grad.norm()).item() < 1e-4, name


def test_a_run_logs_the_recall_share(tmp_path):
    run = tmp_path / "run"
    args = ["train", "experiment=tiny", "pipeline=[stage3]", "trainer.precision=fp32",
            "stages.stage3.recall_weight=2.0", "stages.stage3.recall_window=8", f"run_dir={run}"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert rows and all(0 <= r["recall_share"] < 1 for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["stages.stage3.recall_weight=-1"], "recall_weight=-1.0 must be a number >= 0"),
    (["stages.stage1.recall_weight=1"], "stages.stage1.recall_weight applies to the logits loss"),
    (["stages.stage3.recall_weight=1", "stages.stage3.recall_window=0"], "must be between 1 and seq_len - 2"),
])
def test_bad_recall_settings_stop_with_one_line(overrides, message, tmp_path, capsys):
    assert main(["train", "experiment=tiny", *overrides, f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]
