"""Stage 3 on the student's own sequences (stages.stage3.on_policy): which steps, what the student writes, and a
run that trains on them, resumes to the same losses and marks them in metrics.jsonl."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from distill.cli import main
from distill.config import StudentConfig
from distill.models.transfer import build_student
from distill.on_policy import OnPolicy
from distill.stopping import StopRequest

TINY = ["experiment=tiny", "pipeline=[stage3]", "trainer.precision=fp32"]


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1 / 3, 1.0])
def test_the_chosen_steps_are_that_fraction_evenly_spread(fraction):
    chosen = [OnPolicy(fraction, 8, 1.0, 0).chosen(i) for i in range(120)]
    assert sum(chosen) == round(120 * fraction)
    assert all(sum(chosen[i:i + 12]) in (int(12 * fraction), -(-12 * fraction // 1)) for i in range(0, 108, 12))


def test_the_student_writes_the_last_tokens_and_the_same_step_writes_the_same(tiny_llama):
    student = build_student(tiny_llama, StudentConfig(form="discrete"), attention_layers=[1]).train()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch = torch.randint(0, 256, (3, 40), generator=g)
    policy = OnPolicy(0.5, 28, 1.0, seed=7)  # the last 28 of 40 tokens written
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = policy.sequences(student, batch, step=5)
    assert torch.equal(torch.rand(1), before)  # the training's own random stream is left as it was
    assert student.training  # and the student's mode
    assert a.shape == batch.shape and a.dtype == batch.dtype
    assert torch.equal(a[:, :12], batch[:, :12])
    assert (a[:, 12:] != batch[:, 12:]).float().mean() > 0.5  # written anew (a random student: near-uniform draws)
    assert torch.equal(policy.sequences(student, batch, step=5), a)  # a resumed run writes the same sequences
    assert not torch.equal(policy.sequences(student, batch, step=6), a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_student_writes_through_its_graph_decode_and_the_same_step_writes_the_same(tiny_llama):
    """The CUDA path: the student decodes through its captured graph (`enable_cuda_graph_decode`), the hybrid's
    attention layer included, and a step's sequences are the same when written again (a resumed run)."""
    student = build_student(tiny_llama, StudentConfig(form="discrete"), attention_layers=[1]).cuda().train()
    batch = torch.randint(0, 256, (4, 48), device="cuda")
    policy = OnPolicy(0.5, 32, 1.0, seed=3)
    a = policy.sequences(student, batch, step=2)
    assert student._graph_decoders and student.training
    assert a.shape == batch.shape and torch.equal(a[:, :16], batch[:, :16])
    assert (a[:, 16:] != batch[:, 16:]).float().mean() > 0.5
    assert torch.equal(policy.sequences(student, batch, step=2), a)


def test_a_run_trains_on_them_resumes_to_the_same_losses_and_marks_them(tmp_path, monkeypatch):
    on = [*TINY, "stages.stage3.on_policy=0.5", "stages.stage3.on_policy_tokens=96"]
    assert main(["train", *on, f"run_dir={tmp_path / 'whole'}"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert len(steps) == 8 and [r["on_policy"] for r in steps] == [0.0, 1.0] * 4
    # Stopped after 3 of 8 steps (as by SIGTERM) and resumed: the same sequences, so the same losses.
    calls = []

    def stop_after_three(self, device=None):
        calls.append(1)
        if len(calls) == 3:
            self.signum = signal.SIGTERM
        return self.signum is not None

    with monkeypatch.context() as patch:
        patch.setattr(StopRequest, "pending", stop_after_three)
        assert main(["train", *on, f"run_dir={tmp_path / 'cut'}"]) == 128 + signal.SIGTERM
    assert main(["train", *on, f"run_dir={tmp_path / 'cut'}"]) == 0
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert [(r["step"], r["loss"]) for r in cut] == [(r["step"], r["loss"]) for r in steps]
    # Off-policy the same steps give other losses: the written sequences are what the student trained on.
    assert main(["train", *TINY, f"run_dir={tmp_path / 'off'}"]) == 0
    off = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert off[1]["loss"] != steps[1]["loss"] and off[0]["loss"] == steps[0]["loss"]


@pytest.mark.parametrize("overrides, message", [
    (["stages.stage3.on_policy=1.5"], "on_policy=1.5: give the fraction of steps, 0 to 1"),
    (["stages.stage1.on_policy=0.5"], "stages.stage1.on_policy applies to the logits loss"),
    (["stages.stage3.on_policy=0.5", "stages.stage3.on_policy_tokens=128"], "must be between 1 and seq_len - 1"),
    (["stages.stage3.on_policy=0.5", "stages.stage3.on_policy_tokens=64", "stages.stage3.on_policy_temperature=0"],
     "on_policy_temperature=0.0 must be positive"),
])
def test_bad_on_policy_settings_stop_with_one_line(overrides, message, tmp_path, capsys):
    assert main(["train", "experiment=tiny", *overrides, f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]
