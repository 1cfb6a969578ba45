"""Open a run folder written by `distill train`: its config, teacher, and the student at its newest checkpoint (or
at one checkpoint of it, named as RUN/checkpoints/NAME)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import RunState, load_checkpoint, readable_checkpoint, verify_checkpoint
from .config import Config, ConfigError, typed_run_config, validate_against_teacher
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


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint folder) of `path`: a run folder (its checkpoint is found later), or one checkpoint
    folder inside one (RUN/checkpoints/NAME)."""
    path = Path(path)
    if (path / "state.json").is_file() and path.parent.name == "checkpoints" and \
            (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    return path, None


def is_run(path: str | Path) -> bool:
    """A run folder, or a checkpoint folder inside one."""
    run_dir, _ = locate(path)
    return (run_dir / "config.yaml").is_file()


def load_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml): give the run_dir of a `distill train` run")
    return typed_run_config(run_dir)


def init_from(student, source: str) -> str:
    """student.init_from: copy the trained layers of `source` (a run folder at its newest checkpoint, or one
    checkpoint folder) into `student`; returns a line for the log. A damaged checkpoint is refused, named."""
    from safetensors.torch import load_file

    path = Path(source)
    if (path / "checkpoints").is_dir():
        folder = readable_checkpoint(path)
    else:
        folder = path
        if (path / "state.json").is_file():
            verify_checkpoint(path)
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


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """The run at `path` (a run folder, or RUN/checkpoints/NAME for that checkpoint), its student loaded from the
    newest checkpoint; a damaged checkpoint is refused naming its file (checkpoint.readable_checkpoint)."""
    if not str(path).strip():
        raise ConfigError("checkpoint is empty: give the run_dir of a `distill train` run")
    run_dir, checkpoint = locate(path)
    cfg = load_config(run_dir)
    if checkpoint is None:
        checkpoint = readable_checkpoint(run_dir)
    else:
        verify_checkpoint(checkpoint)
    teacher = load_teacher(cfg.teacher)
    keep = validate_against_teacher(cfg, teacher.num_layers, teacher.max_positions)
    student = build_student(teacher, cfg.student, keep)
    if checkpoint is None and cfg.student.init_from:
        init_from(student, cfg.student.init_from)
    state = load_checkpoint(checkpoint, student, trainer_state=False)[0] if checkpoint is not None else None
    teacher.to(device)
    student.to(device).eval()
    return Run(run_dir, cfg, teacher, student, state, checkpoint)
