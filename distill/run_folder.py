"""Open a run folder written by `distill train`: its config, teacher, and the student at its latest checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoint import RunState, latest_checkpoint, load_checkpoint
from .config import Config, ConfigError, validate_against_teacher
from .models.teachers import Teacher, load_teacher
from .models.transfer import adopt_trained_layers, build_student


@dataclass
class Run:
    path: Path
    cfg: Config
    teacher: Teacher
    student: torch.nn.Module
    state: RunState | None  # None: no checkpoint yet (the student as transferred)
    checkpoint: Path | None


def load_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml): give the run_dir of a `distill train` run")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))


def init_from(student, source: str) -> str:
    """student.init_from: copy the trained layers of `source` (a run folder at its latest checkpoint, or one
    checkpoint folder) into `student`; returns a line for the log."""
    from safetensors.torch import load_file

    path = Path(source)
    folder = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"student.init_from={source!r} is neither a run folder with a checkpoint nor a checkpoint folder "
            "(model.safetensors): give the run_dir of a `distill train` run that has finished a stage"
        )
    taken, left = adopt_trained_layers(student, load_file(str(folder / "model.safetensors")))
    kept = student.config.attention_layers or []
    return (f"student.init_from: SSD layers {taken} from {folder}"
            + (f"; SSD layers {left} as transferred (attention there)" if left else "")
            + (f"; attention layers {kept} keep the teacher's blocks" if kept else ""))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    cfg = load_config(run_dir)
    teacher = load_teacher(cfg.teacher)
    keep = validate_against_teacher(cfg, teacher.num_layers, teacher.max_positions)
    student = build_student(teacher, cfg.student, keep)
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is None and cfg.student.init_from:
        init_from(student, cfg.student.init_from)
    state = load_checkpoint(checkpoint, student)[0] if checkpoint is not None else None
    teacher.to(device)
    student.to(device).eval()
    return Run(Path(run_dir), cfg, teacher, student, state, checkpoint)
