"""Run the pipeline's stages in order over a run folder: optimizer, schedule, precision, logging, checkpoints, resume.

A run folder holds the resolved config (config.yaml), metrics.jsonl (one JSON line per step and per evaluation),
checkpoints/ and summary.md. Started again on the same folder, a run resumes from its latest checkpoint: same stage,
step, data position, optimizer and RNG state.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from . import distributed, graph_step, kernels
from .checkpoint import (
    RunState, atomic_write_text, latest_checkpoint, load_checkpoint, point_latest, resume_point, save_checkpoint,
    set_rng_state,
)
from .stopping import Stopped, StopRequest
from .config import (
    RESUME_FREE_KEYS, Config, ConfigError, StageConfig, check_output_folder, device_named, make_folder,
    read_run_config, validate, validate_against_teacher,
)
from .data import PackedData, build_data
from .metrics_file import read_metrics
from .models.teachers import Teacher, load_teacher
from .models.transfer import build_student
from .stages import stage_step, trainable_parameters
from .stages.common import autocast


class NonFiniteLoss(RuntimeError):
    """A stage's loss turned NaN or inf; the latest checkpoint is the last good one."""


def pick_device(name: str) -> torch.device:
    return device_named(name, "trainer.device")


def lr_factor(step: int, total: int, stage: StageConfig) -> float:
    """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""
    warmup = max(1, int(stage.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    if stage.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if stage.schedule == "cosine" else 1 - progress
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * shape


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """A run folder keeps one config: refuse to resume it with a different one, naming the differences.

    A new folder's config is saved by `save_config` once everything has been checked, so a run refused for bad
    input leaves nothing behind that would then refuse the corrected command.
    """
    saved_path = run_dir / "config.yaml"
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    if saved_path.exists():
        old = _flatten(OmegaConf.to_container(read_run_config(run_dir), resolve=True))
        free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)
        diffs = [k for k in sorted(set(old) | set(new)) if not free(k) and old.get(k) != new.get(k)]
        if diffs:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs[:4])
            raise ConfigError(
                f"run_dir={run_dir} was started with another config ({shown}); "
                "resume it with the same overrides, or choose a new run_dir"
            )


def save_config(run_dir: Path, cfg: Config) -> None:
    """config.yaml of a new run folder, written whole or not at all (a killed start leaves no half a config)."""
    if not (run_dir / "config.yaml").exists():
        make_folder(run_dir, "run_dir")
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))


class MetricsLog:
    """metrics.jsonl: appended line by line; on resume, lines past the checkpoint are dropped (they will be redone)."""

    def __init__(self, path: Path, state: RunState | None, writer: bool = True, pipeline: list[str] | None = None):
        self.path, self.writer = path, writer
        if not writer:  # other ranks of a DeepSpeed run: rank 0 keeps the log
            return
        if state is not None and path.exists():
            damaged: list[int] = []
            rows = read_metrics(path, damaged)
            if damaged:
                print(f"distill: {path}: dropped line(s) {damaged[:5]}, which were not JSON (the file was damaged)",
                      file=sys.stderr, flush=True)
            kept = [row for row in rows if self._logged_by(row, state, pipeline or [])]
            path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        elif path.exists() and state is None:
            path.unlink()

    @staticmethod
    def _logged_by(row: dict, state: RunState, pipeline: list[str]) -> bool:
        """Whether `row` was logged before checkpoint `state` was written: a step up to its step, a stage's
        held-out perplexity once that stage is done (a resume from inside it logs it again)."""
        if "step" in row:
            return (row.get("stage_index"), row["step"]) <= (state.stage_index, state.step)
        if row.get("stage") in pipeline:
            index = pipeline.index(row["stage"])
            return index < state.stage_index or (index == state.stage_index and state.stage_done)
        return True

    def write(self, row: dict) -> None:
        if not self.writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


@torch.no_grad()
def heldout_perplexity(model, batches: list[torch.Tensor], device: torch.device, precision: str) -> float:
    """exp(mean next-token cross-entropy) over the held-out batches."""
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, precision):
            logits = model(input_ids=batch, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


class Trainer:
    def __init__(self, cfg: Config):
        validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        kernels.set_backend(cfg.kernels)
        # DeepSpeed (trainer=zero2/zero3, under torchrun): every rank runs this same trainer on its rows of each
        # batch (distributed.py).
        self.deepspeed = bool(cfg.trainer.deepspeed)
        if self.deepspeed:
            self.device = distributed.local_device(cfg.trainer.device)
            distributed.check(cfg, distributed.world_from_env()[1], self.device)  # before any process waits on another
            self.rank, self.world = distributed.init(self.device)
        else:
            if cfg.trainer.teacher_zero3:
                raise ConfigError(
                    "trainer.teacher_zero3 partitions the teacher with DeepSpeed: use it with trainer=zero2 or zero3"
                )
            self.device = pick_device(cfg.trainer.device)
            self.rank, self.world = 0, 1
        self.is_main = self.rank == 0
        check_resume_config(self.run_dir, cfg)
        check_output_folder(str(self.run_dir / "checkpoints"), "run_dir's checkpoints")
        torch.manual_seed(cfg.trainer.seed)

        with distributed.main_process_first(self.is_main):  # a teacher download lands in the cache once
            self.teacher: Teacher = load_teacher(cfg.teacher)
        keep = validate_against_teacher(cfg, self.teacher.num_layers, self.teacher.max_positions)
        self.student = build_student(self.teacher, cfg.student, keep)
        if cfg.trainer.teacher_zero3:  # only once the student has copied the teacher's whole weights
            self.teacher = distributed.partition_teacher(self.teacher, cfg.trainer.deepspeed, self.device)
        self.teacher.to(self.device)
        self.student.to(self.device)
        self.data: PackedData = build_data(cfg.data, self.teacher.tokenizer)

        # The newest intact checkpoint (rank 0 verifies it; all ranks go on from its choice), past damaged ones.
        checkpoint, passed = distributed.on_main(self.is_main, lambda: resume_point(self.run_dir))
        self.checkpoint = checkpoint
        if passed and self.is_main:
            print(f"distill: resuming from {checkpoint.name}, the newest intact checkpoint, passing over damaged "
                  f"{'; '.join(passed)}", file=sys.stderr, flush=True)
            point_latest(checkpoint.parent, checkpoint.name, keep=0)  # `latest` names what the run goes on from
        self.state, self.payload = RunState(), None
        if checkpoint is not None:
            self.state, self.payload = load_checkpoint(checkpoint, self.student)
            set_rng_state(self.payload["rng"])
        if self.is_main:
            save_config(self.run_dir, cfg)
        distributed.barrier()
        self.metrics = MetricsLog(
            self.run_dir / "metrics.jsonl", self.state if checkpoint else None, self.is_main, list(cfg.pipeline)
        )
        self.stop = StopRequest()  # SIGTERM / SIGINT: stop after the current step with a checkpoint (stopping.py)

    def heldout(self, model) -> float:
        e = self.cfg.eval
        batches = self.data.holdout_batches(e.batch_size, e.seq_len, e.holdout_batches)
        return heldout_perplexity(model, batches, self.device, self.cfg.trainer.precision)

    def run(self) -> dict:
        with self.stop.handle_signals():
            return self._run()

    def _run(self) -> dict:
        cfg, state = self.cfg, self.state
        if "ppl_teacher" not in state.results and self.cfg.data.holdout_tokens:
            state.results["ppl_teacher"] = self.heldout(self.teacher.model)
            state.results["ppl_student_init"] = self.heldout(self.student)
            self.metrics.write(
                {
                    "event": "heldout",
                    "teacher": state.results["ppl_teacher"],
                    "student_init": state.results["ppl_student_init"],
                }
            )
        while state.stage_index < len(cfg.pipeline):
            if state.stage_done:
                state.stage_index, state.step, state.position, state.tokens = state.stage_index + 1, 0, 0, 0
                state.stage_done, self.payload = False, None
                continue
            if self.stop.pending(self.device):  # it came between two stages: the previous one's checkpoint stands
                latest = latest_checkpoint(self.run_dir)
                raise Stopped(self.stop.signum, f"before {cfg.pipeline[state.stage_index]}", latest and latest.name)
            self.run_stage(cfg.pipeline[state.stage_index])
        if self.is_main:
            (self.run_dir / "summary.md").write_text(self.summary())
        distributed.barrier()  # rank 0 has written everything before any process reports the run done
        return state.results

    def run_stage(self, name: str) -> None:
        cfg, state = self.cfg, self.state
        stage = cfg.stages[name]
        total = stage.tokens // (stage.batch_size * stage.seq_len)
        params = trainable_parameters(self.student, stage.trainable)
        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        # trainer.cuda_graphs (CUDA, one process): the whole step replays from one CUDA graph, for runs whose pace
        # the host's kernel launches set (graph_step.py).
        graphs = cfg.trainer.cuda_graphs and self.device.type == "cuda" and not self.deepspeed
        if self.deepspeed:
            optimizer = distributed.make_optimizer(list(params.values()), stage, cfg.trainer, self.device)
        else:
            optimizer = graph_step.make_adamw(list(params.values()), stage.lr, stage.weight_decay, self.device, graphs)
        scheduler = graph_step.lambda_schedule(optimizer, lambda s: lr_factor(s, total, stage))
        saved = self.payload.get("optimizer") if self.payload is not None else None
        engine = None
        if self.deepspeed:
            config = distributed.engine_config(cfg.trainer.deepspeed, stage, self.world)
            engine = distributed.initialize(self.student, optimizer, scheduler, config, stage)
            # DeepSpeed's own checkpoint where this number of processes wrote it; else the consolidated one's.
            why = distributed.resume_engine(engine, self.checkpoint, self.world) if saved else None
            if why:
                self._fresh_moments(name, optimizer, scheduler, saved, why)
        elif saved:
            if saved.get("optimizer") is not None:
                graph_step.load_optimizer_state(optimizer, saved["optimizer"])
                graph_step.load_schedule_state(scheduler, saved["scheduler"])
            else:  # a DeepSpeed checkpoint's moments are partitioned over its processes (in its deepspeed/ folder)
                self._fresh_moments(name, optimizer, scheduler, saved, "it was written by DeepSpeed")
        step_fn = stage_step(stage)
        batches = self.data.batches(stage.batch_size, stage.seq_len, state.position)
        self.student.train()
        bar = tqdm(
            total=total,
            initial=state.step,
            desc=f"{name} ({stage.loss})",
            disable=not cfg.trainer.progress or not self.is_main,
            unit="step",
            dynamic_ncols=True,
        )
        record = state.results.setdefault(name, {})
        first_losses, last_losses = record.setdefault("first", []), record.setdefault("recent", [])
        t0, tokens0 = time.perf_counter(), state.tokens
        captured = None
        while state.step < total:
            position, batch = next(batches)
            batch = batch.to(self.device)
            if graphs and captured is None:
                captured, why = graph_step.capture_step(
                    step_fn, self.student, self.teacher, list(params.values()), optimizer, stage.grad_clip,
                    cfg.trainer.precision, batch,
                )
                if captured is None:
                    graphs = False
                    print(f"{name}: runs eagerly: its step could not be captured as a CUDA graph ({why})", flush=True)
            if captured is not None:
                # A non-finite step left the weights as they were (the graph skips its optimizer update).
                result, grad_norm = captured(batch)
                result, grad_norm = result.to_floats(), float(grad_norm)
                self._check_finite(name, result)
                scheduler.step()
            elif engine is None:
                optimizer.zero_grad(set_to_none=True)
                result = step_fn(self.student, self.teacher, batch, cfg.trainer.precision).to_floats()
                self._check_finite(name, result)
                grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), stage.grad_clip)
                optimizer.step()
                scheduler.step()
            else:  # this rank's rows; losses and gradients averaged over the ranks
                result = distributed.forward_backward(
                    engine, step_fn, self.teacher, batch, cfg.trainer.precision, self.rank, self.world
                )
                self._check_finite(name, result)
                engine.step()
                grad_norm = engine.get_global_grad_norm()
            state.step, state.position, state.tokens = state.step + 1, position, state.tokens + batch.numel()
            if len(first_losses) < 3:
                first_losses.append(result.loss)
            last_losses[:] = [*last_losses[-2:], result.loss]  # single batches are noisy: summaries average 3
            tok_s = (state.tokens - tokens0) / (time.perf_counter() - t0)
            if state.step % cfg.trainer.log_every == 0 or state.step == total:
                self.metrics.write(
                    {
                        "stage": name,
                        "stage_index": state.stage_index,
                        "step": state.step,
                        "tokens": state.tokens,
                        "loss": result.loss,
                        "lr": float(scheduler.get_last_lr()[0]),
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": tok_s,
                        "per_layer": result.per_layer,
                        **result.extra,
                    }
                )
            bar.set_postfix(loss=f"{result.loss:.4g}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            record["last"] = result.loss
            record["per_layer"] = result.per_layer
            every = cfg.trainer.checkpoint_every
            stopping = state.step < total and self.stop.pending(self.device)
            checkpoint = f"{name}-step{state.step:06d}"
            if stopping or (every and state.step % every == 0 and state.step < total):
                self._save(checkpoint, optimizer, scheduler, engine)
            if stopping:
                bar.close()
                if captured is not None:
                    captured.close()
                raise Stopped(self.stop.signum, f"in {name} at step {state.step} of {total}", checkpoint)
        bar.close()
        if captured is not None:
            captured.close()
        self.student.eval()
        if cfg.data.holdout_tokens:  # before the engine goes: under ZeRO-3 its hooks gather the weights
            state.results[name]["ppl"] = self.heldout(self.student)
            self.metrics.write({"event": "heldout", "stage": name, "student": state.results[name]["ppl"]})
        state.results[name]["tokens"] = state.tokens
        state.stage_done = True
        self._save(f"{name}-done", None, None, engine)
        if engine is not None:
            engine.destroy()  # its hooks must not fire in the next stage's engine

    def _check_finite(self, stage: str, result) -> None:
        bad = [i for i, v in result.per_layer.items() if not math.isfinite(v)]
        if not math.isfinite(result.loss) or bad:
            where = f" in layer {bad[0]}" if bad else ""
            raise NonFiniteLoss(
                f"{stage}: the loss is {result.loss} at step {self.state.step + 1}{where}; nothing of this step was "
                f"saved and the latest checkpoint in {self.run_dir / 'checkpoints'} is the last good one. "
                f"Lower stages.{stage}.lr or use trainer.precision=fp32"
            )

    def _save(self, name: str, optimizer, scheduler, engine=None) -> None:
        """A checkpoint. Under DeepSpeed its optimizer moments are DeepSpeed's own files (partitioned over the ranks,
        in the checkpoint's deepspeed/ folder); the consolidated weights, schedule and data position beside them
        resume a run on any number of processes."""
        if optimizer is None:
            payload = None
        else:
            moments = None if self.deepspeed else optimizer.state_dict()
            payload = {"optimizer": moments, "scheduler": scheduler.state_dict()}
        keep = self.cfg.trainer.keep_checkpoints
        if engine is not None:
            distributed.save(self.run_dir, name, engine, self.student, payload, self.state, keep, self.rank, self.world)
        else:
            save_checkpoint(self.run_dir, name, self.student, payload, self.state, keep)

    def _fresh_moments(self, name: str, optimizer, scheduler, saved: dict, why: str) -> None:
        """Resume a stage from the consolidated checkpoint without its optimizer moments: the schedule goes on where
        it was, and the fresh optimizer takes the schedule's current learning rate (not the first step's)."""
        scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        if self.is_main:
            print(f"{name}: resuming at step {self.state.step} with fresh optimizer moments ({why})", flush=True)

    def summary(self) -> str:
        """Markdown: per-stage loss (mean of the first 3 steps -> of the last 3), held-out perplexity."""
        r = self.state.results
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        lines = [
            "| after | loss | tokens | loss, first 3 steps -> last 3 | held-out perplexity |",
            "|---|---|---|---|---|",
        ]
        if "ppl_teacher" in r:
            lines.append(f"| teacher | | | | {r['ppl_teacher']:.2f} |")
        if "ppl_student_init" in r:
            lines.append(f"| transfer (no training) | | 0 | | {r['ppl_student_init']:.2f} |")
        for name in self.cfg.pipeline:
            s = r.get(name)
            if not s:
                continue
            ppl = f"{s['ppl']:.2f}" if "ppl" in s else ""
            loss = f"{mean(s.get('first', [])):.4g} -> {mean(s.get('recent', [])):.4g}"
            lines.append(f"| {name} | {self.cfg.stages[name].loss} | {s.get('tokens', 0)} | {loss} | {ppl} |")
        ssd = self.student.ssd_layers
        head = (
            f"Student: {len(ssd)} of {self.teacher.num_layers} layers converted to SSD ({self.cfg.student.form}); "
            f"SSD layers {ssd}.\n\n"
        )
        return head + "\n".join(lines) + "\n"


def train(cfg: Config) -> dict:
    return Trainer(cfg).run()
