"""How a stage takes its optimizer steps: one engine per backend, with the same few methods, chosen once per stage.

The trainer's stage loop (trainer.Trainer.run_stage) only feeds batches, logs, stops and checkpoints; an engine owns
the rest of a step and the state a checkpoint keeps of it:

- `EagerStepEngine`: one process, the step run op by op (forward and backward, the NaN/inf check, clipping, AdamW,
  the schedule);
- `GraphStepEngine`: the same step captured once as a CUDA graph and replayed (graph_step.py), on CUDA without
  DeepSpeed when `trainer.cuda_graphs` is on; where the step cannot be captured it says why and runs eagerly;
- `DeepSpeedStepEngine`: each rank's rows of the batch through DeepSpeed's engine (distributed.py), when
  `trainer.deepspeed` holds a config.

Each has `step(batch)` -> (StepResult of floats, gradient norm), `lr`, `restore(saved, folder)` (the optimizer and
schedule of a checkpoint), `save(...)` (a checkpoint with them), `steps_done()` and `close()`. Their checkpoints are
one format: eager and captured ones hold the same optimizer state, so either resumes the other; a DeepSpeed one
holds its moments in DeepSpeed's own files, and resumes anywhere else (or on another number of processes) from the
consolidated weights and schedule with fresh moments, `restore` saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed, graph_step
from .checkpoint import RunState, save_checkpoint
from .config import StageConfig, TrainerConfig
from .models.teachers import Teacher
from .stages import StepResult, stage_step


@dataclass
class StepSetup:
    """What an engine is built from: one stage of one run."""

    name: str  # the stage's, for messages
    stage: StageConfig
    student: torch.nn.Module
    teacher: Teacher
    params: list[torch.nn.Parameter]  # the stage's trainable parameters; the rest of the student is frozen
    schedule: Callable[[int], float]  # the learning-rate factor after each number of steps
    precision: str
    device: torch.device
    check: Callable[[StepResult], None]  # raises on a non-finite loss; called before the step changes any weight


class StepEngine:
    """The optimizer, its schedule and how one step runs; see the module's docstring."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def __init__(self, setup: StepSetup):
        self.setup = setup
        self.step_fn = stage_step(setup.stage)

    def step(self, batch: torch.Tensor) -> tuple[StepResult, torch.Tensor | float]:
        """One optimizer step on `batch` (the global batch, on the device): its StepResult of floats and its
        gradient norm (a 0-d tensor or a float, read when logged, so that an eager step need not wait for the GPU).
        A non-finite loss raises through setup.check and leaves the weights as they were."""
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """The schedule's current learning rate (after a step: the next step's)."""
        return float(self.scheduler.get_last_lr()[0])

    def restore(self, saved: dict, folder: Path) -> str | None:
        """Take up the optimizer and schedule of checkpoint `folder` (`saved`: its trainer.pt's "optimizer" entry)
        where they stopped; None, or why the optimizer moments start fresh (the schedule still goes on)."""
        raise NotImplementedError

    def save(self, run_dir: Path, name: str, state: RunState, keep: int, optimizer: bool = True) -> None:
        """Checkpoint `name` of the student and run state, with this engine's optimizer and schedule unless
        `optimizer` is False (at the end of a stage: the next one starts its own)."""
        raise NotImplementedError

    def steps_done(self) -> None:
        """The stage takes no more steps: drop what only the steps need (a CUDA graph's memory pool), before the
        held-out evaluation. What the last checkpoint needs stays until `close`."""

    def close(self) -> None:
        """Release the engine at the end of its stage (or run)."""

    def _payload(self, moments: dict | None) -> dict:
        return {"optimizer": moments, "scheduler": self.scheduler.state_dict()}


def fresh_moments(optimizer: torch.optim.Optimizer, scheduler, saved: dict) -> None:
    """Go on from a checkpoint without its optimizer moments: the schedule goes on where it was, and the fresh
    optimizer takes the schedule's current learning rate (not the first step's). A tensor rate (a captured step's
    optimizer: the graph reads that tensor) is filled in place."""
    scheduler.load_state_dict(saved["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(float(lr))
        else:
            group["lr"] = lr


class EagerStepEngine(StepEngine):
    """One process, the step run op by op."""

    def __init__(self, setup: StepSetup, graphs: bool = False):
        super().__init__(setup)
        stage = setup.stage
        self.optimizer = graph_step.make_adamw(setup.params, stage.lr, stage.weight_decay, setup.device, graphs)
        self.scheduler = graph_step.lambda_schedule(self.optimizer, setup.schedule)

    def step(self, batch):
        s = self.setup
        self.optimizer.zero_grad(set_to_none=True)
        result = self.step_fn(s.student, s.teacher, batch, s.precision).to_floats()
        s.check(result)
        grad_norm = torch.nn.utils.clip_grad_norm_(s.params, s.stage.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return result, grad_norm

    def restore(self, saved, folder):
        if saved.get("optimizer") is None:  # a DeepSpeed checkpoint's moments are partitioned over its processes
            fresh_moments(self.optimizer, self.scheduler, saved)
            return "it was written by DeepSpeed"
        # Either kind of optimizer (eager or captured) keeps its own run flags with the saved state.
        graph_step.load_optimizer_state(self.optimizer, saved["optimizer"])
        graph_step.load_schedule_state(self.scheduler, saved["scheduler"])
        return None

    def save(self, run_dir, name, state, keep, optimizer=True):
        payload = self._payload(self.optimizer.state_dict()) if optimizer else None
        save_checkpoint(run_dir, name, self.setup.student, payload, state, keep)


class GraphStepEngine(EagerStepEngine):
    """The eager engine's step captured as a CUDA graph on the stage's first batch and replayed for every batch
    (graph_step.py: its optimizer is fused and capturable, with a tensor learning rate). Where the capture fails it
    prints why and the stage goes on eagerly with the same optimizer."""

    def __init__(self, setup: StepSetup):
        super().__init__(setup, graphs=True)
        self.captured: graph_step.CapturedStep | None = None
        self.eager = False  # the capture failed: every step runs eagerly

    def step(self, batch):
        s = self.setup
        if self.captured is None and not self.eager:
            self.captured, why = graph_step.capture_step(
                self.step_fn, s.student, s.teacher, s.params, self.optimizer, s.stage.grad_clip, s.precision, batch
            )
            if self.captured is None:
                self.eager = True
                print(f"{s.name}: runs eagerly: its step could not be captured as a CUDA graph ({why})", flush=True)
        if self.captured is None:
            return super().step(batch)
        # A non-finite step left the weights as they were (the graph skips its optimizer update).
        result, grad_norm = self.captured(batch)
        result, grad_norm = result.to_floats(), float(grad_norm)  # the graph's outputs: overwritten by the next replay
        s.check(result)
        self.scheduler.step()
        return result, grad_norm

    def steps_done(self):
        if self.captured is not None:
            self.captured.close()
            self.captured = None

    def close(self):
        self.steps_done()


class DeepSpeedStepEngine(StepEngine):
    """A DeepSpeed engine over the student with the stage's client optimizer and schedule (distributed.py): each
    rank takes its rows of the batch; losses and gradients are averaged over the ranks."""

    def __init__(self, setup: StepSetup, trainer: TrainerConfig):
        super().__init__(setup)
        self.rank, self.world = distributed.rank_and_world()
        self.optimizer = distributed.make_optimizer(setup.params, setup.stage, trainer, setup.device)
        self.scheduler = graph_step.lambda_schedule(self.optimizer, setup.schedule)
        config = distributed.engine_config(trainer.deepspeed, setup.stage, self.world)
        self.engine = distributed.initialize(setup.student, self.optimizer, self.scheduler, config, setup.stage)

    def step(self, batch):
        s = self.setup
        result = distributed.forward_backward(self.engine, self.step_fn, s.teacher, batch, s.precision, self.rank,
                                              self.world)
        s.check(result)
        self.engine.step()  # averages the gradients, clips them, runs the optimizer and the schedule
        return result, self.engine.get_global_grad_norm()

    def restore(self, saved, folder):
        # DeepSpeed's own checkpoint where this number of processes wrote it; else the consolidated one's.
        why = distributed.resume_engine(self.engine, folder, self.world)
        if why:
            fresh_moments(self.optimizer, self.scheduler, saved)
        return why

    def save(self, run_dir, name, state, keep, optimizer=True):
        """Its optimizer moments are DeepSpeed's own files (partitioned over the ranks, in the checkpoint's
        deepspeed/ folder); the consolidated weights, schedule and data position beside them resume a run on any
        number of processes."""
        payload = self._payload(None) if optimizer else None
        s = self.setup
        distributed.save(run_dir, name, self.engine, s.student, payload, state, keep, self.rank, self.world)

    def close(self):
        self.engine.destroy()  # its hooks must not fire in the next stage's engine


def engine_kind(trainer: TrainerConfig, device: torch.device) -> type[StepEngine]:
    """DeepSpeed's wherever trainer.deepspeed holds a config; a captured CUDA graph on CUDA with
    trainer.cuda_graphs; else the eager step."""
    if trainer.deepspeed:
        return DeepSpeedStepEngine
    if trainer.cuda_graphs and device.type == "cuda":
        return GraphStepEngine
    return EagerStepEngine


def build(setup: StepSetup, trainer: TrainerConfig) -> StepEngine:
    """The stage's engine, of `engine_kind`."""
    kind = engine_kind(trainer, setup.device)
    if kind is DeepSpeedStepEngine:
        return kind(setup, trainer)  # the optimizer kind and the DeepSpeed config
    return kind(setup)
