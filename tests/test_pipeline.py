"""The whole pipeline on a tiny random teacher: all three stages, checkpoints, a real kill and a resume."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import RunState, latest_checkpoint, save_checkpoint
from distill.cli import main
from distill.trainer import Trainer
from tests.conftest import wait_for_checkpoint


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "step" in r]


def test_three_stages_train_and_summarise(tiny_cfg):
    cfg = tiny_cfg("trainer.checkpoint_every=3")
    trainer = Trainer(cfg)
    results = trainer.run()
    run_dir = trainer.run_dir
    steps = losses(run_dir)
    assert [s for s, *_ in steps] == ["stage1"] * 8 + ["stage2"] * 8 + ["stage3"] * 8
    assert results["stage1"]["last"] < results["stage1"]["first"][0]  # the matrix fit improves even in 8 steps
    for name in ("stage1", "stage2", "stage3"):
        assert set(results[name]) >= {"ppl", "tokens", "last"} and results[name]["tokens"] == 2048
    assert latest_checkpoint(run_dir).name == "stage3-done"
    assert len([p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]) == 2  # keep_checkpoints
    summary = (run_dir / "summary.md").read_text()
    assert "| stage1 | matrix | 2048 |" in summary and "| teacher |" in summary and "| transfer" in summary
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert set(row["per_layer"]) == {"0", "2", "3"}  # layer 1 stayed attention


def test_kill_and_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    """SIGKILL a real `distill train` process in stage 2, start it again: it finishes like a run never stopped."""
    overrides = ["experiment=tiny", "trainer.checkpoint_every=1", "stages.stage1.tokens=1024"]
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "train", *overrides, f"run_dir={killed_dir}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, killed_dir, "stage2-step00000")
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = latest_checkpoint(killed_dir).name
    assert stopped_at.startswith("stage2-step")

    assert main(["train", *overrides, f"run_dir={killed_dir}"]) == 0  # resumes
    assert main(["train", *overrides, f"run_dir={whole_dir}"]) == 0  # never stopped

    resumed, whole = losses(killed_dir), losses(whole_dir)
    assert [r[:2] for r in resumed] == [w[:2] for w in whole]  # no step lost or repeated in the log
    for (_, _, a), (_, _, b) in zip(resumed, whole):
        assert abs(a - b) <= 1e-4 * abs(b)
    a = load_file(latest_checkpoint(killed_dir) / "model.safetensors")
    b = load_file(latest_checkpoint(whole_dir) / "model.safetensors")
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_sigterm_stops_after_a_step_with_its_checkpoint_and_the_run_resumes(tmp_path):
    """SIGTERM (a scheduler's preemption, `timeout`) to a real `distill train`: it saves where it is and exits 143;
    the checkpoint holds the last logged step, and the same command finishes the run with no step lost or redone."""
    overrides = ["experiment=tiny", "stages.stage2.tokens=32768", f"run_dir={tmp_path}"]  # checkpoints only at ends
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "train", *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, tmp_path, "stage1-done")
    assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-800:]
    assert "stopped by SIGTERM" in err.decode() and "run the same command to resume" in err.decode()
    latest = latest_checkpoint(tmp_path)
    state = json.loads((latest / "state.json").read_text())
    stage, step, _ = losses(tmp_path)[-1]
    assert ["stage1", "stage2", "stage3"][state["stage_index"]] == stage and state["step"] == step
    assert latest.name == (f"stage2-step{step:06d}" if stage == "stage2" else "stage1-done")

    assert main(["train", *overrides]) == 0
    steps = [(s, n) for s, n, _ in losses(tmp_path)]
    assert steps == [("stage1", n) for n in range(1, 9)] + [("stage2", n) for n in range(1, 129)] + \
        [("stage3", n) for n in range(1, 9)]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    save_checkpoint(tmp_path, "first", model, None, RunState(step=1))
    import distill.checkpoint as ckpt

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, "second", model, None, RunState(step=2))
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "first" and json.loads((latest / "state.json").read_text())["step"] == 1
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")) and not (tmp_path / "checkpoints" / "second").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["student.attention_layers=[7]"], "student.attention_layers has [7]: the teacher has layers 0..3"),
        (["student.ssd_layers=[0,1]", "student.attention_layers=[2]"], "not both"),
        (["stages.stage1.seq_len=1024"], "stages.stage1.seq_len=1024 is longer than the teacher's 512 positions"),
        (["teacher.architecture.model_type=gpt2"], "'gpt2' is not supported; supported model types: llama"),
        (["pipeline=[stage1,stage9]"], "pipeline names 'stage9'"),
        (["stages.stage1.trainable=everything"], "stages.stage1.trainable='everything'"),
        (["teacher=nonexistent"], "nonexistent"),
        (["stages.stage3.divergence=kl"], "stages.stage3.divergence='kl': use one of"),
        (["stages.stage3.divergence=jsd", "stages.stage3.jsd_beta=1.0"], "strictly between 0 and 1"),
        (["data.mix_fraction=0.5"], "data.mix_fraction > 0 needs data.mix_path"),
        (["data.mix_path=/nonexistent/shard-*.jsonl.gz", "data.mix_fraction=0.5"], "data.mix_path"),
    ],
)
def test_bad_input_stops_with_one_clear_line(tmp_path, capsys, overrides, message):
    assert main(["train", "experiment=tiny", f"run_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "config.yaml").exists()  # the corrected command is not refused as a conflicting resume


def test_empty_data_file_is_refused(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["train", "experiment=tiny", f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path}/empty.jsonl"]) == 2
    assert "data.path=" in capsys.readouterr().err


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    args = ["train", "experiment=tiny", f"run_dir={tmp_path}", "pipeline=[stage1]", "stages.stage1.tokens=512"]
    assert main(args) == 0
    assert main(args) == 0  # same config: resumes (nothing left to do)
    assert main([*args, "stages.stage1.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "was started with another config (stages.stage1.lr: 0.001 -> 0.5)" in err


def test_a_folder_of_an_older_version_resumes(tmp_path, capsys):
    """Options added since a folder was started are missing from its config.yaml: it ran as their defaults, so it
    resumes; a missing option given another value than its default is still refused."""
    import yaml

    args = ["train", "experiment=tiny", f"run_dir={tmp_path}", "pipeline=[stage1]", "stages.stage1.tokens=512"]
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["student"]["d_state"], saved["stages"]["stage1"]["recall_weight"]  # as an older version wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(args) == 0
    assert main([*args, "student.d_state=128"]) == 2
    assert "student.d_state: 0 -> 128" in capsys.readouterr().err
