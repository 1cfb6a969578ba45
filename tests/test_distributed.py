"""DeepSpeed ZeRO-2 over two CPU processes (gloo), launched by torchrun: the same run as one process at the same
global batch, checkpoints that resume on another number of processes, and bad settings stopped with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

BASE = ["experiment=tiny", "trainer.precision=fp32"]


def run(run_dir: Path, *overrides: str, procs: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    command = [*launcher, "-m", "distill", "train", *BASE, f"run_dir={run_dir}", *overrides]
    if procs == 1 and not any(o.startswith("trainer=") for o in overrides):
        command = [sys.executable, "-m", "distill", "train", *BASE, f"run_dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "step" in r]


def test_zero2_on_two_processes_equals_one_process(tmp_path):
    run(tmp_path / "one", procs=1)
    run(tmp_path / "two", "trainer=zero2")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(one) == 24  # 8 steps in each of the 3 stages
    for (stage, step, a), (_, _, b) in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (stage, step, a, b)
    # Rank 0 alone writes the run folder; its checkpoint holds the whole weights.
    assert (tmp_path / "two" / "summary.md").exists()
    assert (tmp_path / "two" / "checkpoints" / "stage3-done" / "model.safetensors").exists()


def test_a_two_process_checkpoint_resumes_on_one_process(tmp_path):
    run_dir = tmp_path / "run"
    run(run_dir, "trainer=zero2", "trainer.checkpoint_every=4", "trainer.keep_checkpoints=10")
    done = losses(run_dir)
    # As if killed after step 4 of stage 2: the latest checkpoint is that one.
    (run_dir / "checkpoints" / "latest").write_text("stage2-step000004")
    out = run(run_dir, "trainer.checkpoint_every=4", "trainer.keep_checkpoints=10", procs=1)
    assert "fresh optimizer moments" in out.stdout + out.stderr
    resumed = losses(run_dir)
    assert [r[:2] for r in resumed] == [r[:2] for r in done]  # stage 2 redone from step 5, then stage 3
    assert resumed[:12] == done[:12]  # stage 1 and stage 2's first 4 steps are the 2-process run's
    # The same weights and data position: the first resumed step sees what the uninterrupted run saw.
    assert abs(resumed[12][2] - done[12][2]) <= 1e-4 * done[12][2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages.stage1.batch_size=3"], "stages.stage1.batch_size=3 is the global batch and must divide by the 2"),
        (["+trainer.deepspeed.fp16.enabled=true"], "trainer.deepspeed.fp16 is not supported"),
        (["trainer.deepspeed.zero_optimization.stage=3"], "zero_optimization.stage=3"),
    ],
)
def test_bad_distributed_settings_stop_with_one_line(tmp_path, overrides, message):
    out = run(tmp_path / "run", "trainer=zero2", *overrides, check=False)
    assert out.returncode != 0
    assert message in out.stderr
