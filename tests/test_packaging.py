"""The command line and the wheel: configs and the bundled sample ship inside the package, help is honest."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distill.cli import build_parser, compose

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_configs_and_sample(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                            capture_output=True, text=True)
    if result.returncode != 0 and "hatchling" in result.stderr:
        pytest.skip(f"the build backend cannot be fetched here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("distill-*.whl"))).namelist()
    for needed in ("distill/conf/config.yaml", "distill/conf/teacher/smollm2.yaml",
                   "distill/conf/experiment/cpu_demo.yaml", "distill/data_files/gutenberg_sample.jsonl.gz",
                   "distill/data_files/ATTRIBUTION.md", "distill/eval/tasks/distill_offline.yaml",
                   "distill/models/student/modeling_distill.py"):
        assert needed in names, needed


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "distill", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "train" in out.stdout
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == {"train", "generate", "eval", "export", "inspect", "rank", "compare"}  # each is run by a test


def test_default_config_is_the_cpu_demo():
    cfg = compose([])
    assert cfg.teacher.name == "smollm2" and cfg.student.ssd_layers and cfg.pipeline == ["stage1", "stage2", "stage3"]
    assert cfg.data.path.startswith("pkg://")


def test_gpu_preset_composes_and_validates(monkeypatch):
    from distill.cli import compose
    from distill.config import validate

    monkeypatch.setenv("DISTILL_DATA_DIR", "/data")
    cfg = compose(["experiment=gpu_smollm2", "student=mamba2"])
    validate(cfg)
    assert cfg.data.path == "/data/train_text/nltk_*.jsonl.gz" and cfg.data.mix_fraction == 0.5
    assert cfg.student.form == "mamba2" and cfg.stages["stage3"].seq_len == 2048


def test_ablation_presets_share_one_budget(monkeypatch):
    """The stage ablation's three presets: the GPU recipe, different stages, the same number of tokens in all."""
    from distill.cli import compose
    from distill.config import validate

    monkeypatch.setenv("DISTILL_DATA_DIR", "/data")
    totals = {}
    for name, stages in (("123", ["stage1", "stage2", "stage3"]), ("23", ["stage2", "stage3"]), ("3", ["stage3"])):
        cfg = compose([f"experiment=ablation_{name}"])
        validate(cfg)
        assert cfg.pipeline == stages and cfg.data.mix_fraction == 0.5 and cfg.run_dir == f"runs/abl_{name}"
        totals[name] = sum(cfg.stages[s].tokens for s in stages)
    assert len(set(totals.values())) == 1, totals


def test_ten_minute_preset_is_the_gpu_recipe_at_a_larger_budget(monkeypatch):
    from distill.cli import compose
    from distill.config import validate

    monkeypatch.setenv("DISTILL_DATA_DIR", "/data")
    base, long = compose(["experiment=gpu_smollm2"]), compose(["experiment=gpu_smollm2_10min"])
    validate(long)
    assert long.data.mix_fraction == base.data.mix_fraction and long.trainer.checkpoint_every == 100
    for name in ("stage1", "stage2", "stage3"):
        assert long.stages[name].lr == base.stages[name].lr and long.stages[name].tokens > base.stages[name].tokens
    assert sum(long.stages[s].tokens for s in long.pipeline) == 67_108_864
