"""Recall positions (where the teacher needs far context) and stage 3's weighting towards them
(stages.stage3.recall_weight): the positions against a direct computation, the weights, the step's loss against the
full-logits definition with the same weights, a run that logs their share, and bad settings."""

from __future__ import annotations

import json

import pytest
import torch

from distill.cli import main
from distill.config import StageConfig, StudentConfig
from distill.models.transfer import build_student
from distill.recall import recall_positions, recall_weights, window_mask
from distill.stages import stage_step
from distill.stages.divergence import divergence_reference
from distill.stages.stage3 import distillation_loss


def _ids(b, L, vocab=257):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return torch.randint(0, vocab, (b, L), generator=g)


def test_recall_positions_equal_the_windowed_teachers_loss_on_the_true_token(tiny_teacher):
    ids = _ids(3, 48)
    with torch.no_grad():
        full = tiny_teacher.model(input_ids=ids, use_cache=False).logits.double()
        local = tiny_teacher.model(input_ids=ids, attention_mask=window_mask(48, 5, 2, "cpu"), use_cache=False)
    targets = ids[:, 1:, None]
    gain = (torch.log_softmax(full[:, :-1], -1).gather(-1, targets)
            - torch.log_softmax(local.logits.double()[:, :-1], -1).gather(-1, targets))[..., 0]
    # The first window + sink positions see their whole context either way (gain 0): the rest decide the margin,
    # about half of them on either side, so the test can fail both ways.
    margin = gain[:, 7:].median().item()
    with torch.no_grad():
        hidden = tiny_teacher.final_hidden(ids)
    got = recall_positions(tiny_teacher, ids, hidden, window=5, sink=2, margin=margin)
    assert got.shape == (3, 47) and got.dtype == torch.bool
    clear = (gain - margin).abs() > 1e-4  # float32 against float64: only positions at the threshold may differ
    assert clear[:, 7:].float().mean() > 0.9
    assert torch.equal(got[clear], (gain > margin)[clear])
    assert 0.3 < got[:, 7:].float().mean() < 0.7


def test_recall_weights_have_mean_one_and_the_ratio_asked_for():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    positions = torch.rand(2, 63, generator=g) < 0.3
    positions[0, 0], positions[0, 1] = True, False
    weights, share = recall_weights(positions, 3.0)
    flat = positions.flatten()
    assert weights.shape == (2 * 63,)
    assert abs(weights.mean().item() - 1) < 1e-6
    assert abs(share.item() - flat.float().mean().item()) < 1e-7
    assert torch.allclose(weights[flat] / weights[~flat][0], torch.full((int(flat.sum()),), 4.0))


def test_a_weighted_step_equals_the_full_logits_reference_with_the_same_weights(tiny_teacher):
    student = build_student(tiny_teacher, StudentConfig(), attention_layers=[1])
    ids = _ids(2, 40)
    # margin 0: every position where the windowed teacher is less sure of the true token (about half)
    cfg = StageConfig(loss="logits", tokens=80, temperature=1.5, chunk_tokens=13, recall_weight=10.0,
                      recall_window=4, recall_sink=1, recall_margin=0.0)
    student.zero_grad()
    result = stage_step(cfg)(student, tiny_teacher, ids, "fp32").to_floats()
    fused = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1].double()
    t_logits = tiny_teacher.logits(ids)[:, :-1].double()
    positions = recall_positions(tiny_teacher, ids, tiny_teacher.final_hidden(ids), 4, 1, 0.0)
    weights, share = recall_weights(positions, 10.0)
    assert 0 < share.item() < 1
    loss, _ = divergence_reference(s_logits, t_logits, "forward_kl", 1.5, weights=weights.double().view(2, 39))
    loss.backward()
    plain, _ = distillation_loss(s_logits.detach(), t_logits, 1.5)
    assert abs(result.loss - loss.item()) < 1e-4 * loss.item()  # a float32 step: KL of near logits cancels
    # The weights changed it: the step is the weighted loss, far closer to it than to the plain mean (the two
    # differed by 5e-4 to 3% of the loss in 100 draws; the step's float32 error is ~1e-6).
    assert abs(result.loss - loss.item()) < 0.1 * abs(result.loss - plain.item())
    assert result.extra["recall_share"] == pytest.approx(share.item())
    for name, p in student.named_parameters():
        if p.grad is not None and p.grad.norm() > 0:
            assert ((fused[name] - p.grad).norm() / p.grad.norm()).item() < 1e-4, name


def test_a_run_logs_the_recall_share(tmp_path):
    run = tmp_path / "run"
    args = ["train", "experiment=tiny", "pipeline=[stage3]", "trainer.precision=fp32",
            "stages.stage3.recall_weight=2.0", "stages.stage3.recall_window=8", "stages.stage3.recall_margin=0.0",
            f"run_dir={run}"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert rows and all(0 < r["recall_share"] < 1 for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["stages.stage3.recall_weight=-1"], "recall_weight=-1.0 must be a number >= 0"),
    (["stages.stage1.recall_weight=1"], "stages.stage1.recall_weight applies to the logits loss"),
    (["stages.stage3.recall_weight=1", "stages.stage3.recall_window=0"], "must be between 1 and seq_len - 1"),
    (["stages.stage3.recall_weight=1", "stages.stage3.recall_margin=-1"], "recall_sink and recall_margin must be"),
])
def test_bad_recall_settings_stop_with_one_line(overrides, message, tmp_path, capsys):
    assert main(["train", "experiment=tiny", *overrides, f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]
