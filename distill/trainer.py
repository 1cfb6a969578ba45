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

from . import distributed, kernels, precision, step_engine
from .checkpoint import (
    RunState, atomic_write_text, latest_checkpoint, load_checkpoint, point_latest, resume_point, set_rng_state,
)
from .stopping import Stopped, StopRequest
from .config import (
    RESUME_FREE_KEYS, Config, ConfigError, StageConfig, check_output_folder, device_named, make_folder,
    read_run_config, validate, validate_against_teacher,
)
from .data import PackedData, build_data
from .metrics_file import read_metrics
from .models.rope import use_fused_rope
from .models.teachers import Teacher, load_teacher
from .models.transfer import build_student
from .on_policy import OnPolicy
from .run_folder import init_from
from .stages import trainable_parameters
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


def _defaults(keys) -> dict:
    """The defaults of those flattened config keys (`student.d_state`, `stages.stage3.recall_weight`) that have one."""
    top = _flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    stage = _flatten(OmegaConf.to_container(OmegaConf.structured(StageConfig)))  # stages: StageConfig by name
    out = {}
    for key in keys:
        parts = key.split(".")
        found = stage if parts[0] == "stages" and len(parts) == 3 else top
        name = parts[2] if found is stage else key
        if name in found:
            out[key] = found[name]
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
        # An option added since the folder was started is missing from its config.yaml: the run ran as its default
        # (a new option's default keeps what the code did before), so a folder of an older version still resumes.
        old.update(_defaults(k for k in new if k not in old))
        free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)
        diffs = [k for k in sorted(set(old) | set(new)) if not free(k) and old.get(k) != new.get(k)]
        if diffs:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs[:4])
            raise ConfigError(
                f"run_dir={run_dir} was started with another config ({shown}); "
                "resume it with the same overrides, or choose a new run_dir"
            )


def resolve_precision(cfg: Config, device: torch.device, run_dir: Path, log: bool = True) -> None:
    """Replace `auto` in trainer.precision and teacher.dtype by what `device` computes natively (precision.py), in
    place, so that config.yaml records what the run computes. A run folder resumed with `auto` keeps the values it
    started with, whatever machine resumes it."""
    t = cfg.trainer
    saved_path = run_dir / "config.yaml"
    asked = (t.precision, cfg.teacher.dtype)
    if "auto" in asked and saved_path.is_file():
        try:
            saved = OmegaConf.load(saved_path)
        except Exception:  # a damaged config.yaml: check_resume_config says so, in one line
            saved = OmegaConf.create()
        if t.precision == "auto":
            t.precision = OmegaConf.select(saved, "trainer.precision", default="auto")
        if cfg.teacher.dtype == "auto":
            cfg.teacher.dtype = OmegaConf.select(saved, "teacher.dtype", default="auto")
        if "auto" not in (t.precision, cfg.teacher.dtype) and log:
            print(f"precision: {t.precision} autocast, teacher weights {cfg.teacher.dtype} (auto: as {saved_path} "
                  "records)", flush=True)
            return
    resolved = precision.resolve(t.precision, cfg.teacher.dtype, device)
    t.precision, cfg.teacher.dtype = resolved.precision, resolved.teacher_dtype
    if resolved.why and log:
        chose = [f"trainer.precision={t.precision}" if asked[0] == "auto" else "",
                 f"teacher.dtype={cfg.teacher.dtype}" if asked[1] == "auto" else ""]
        print(f"precision: auto chose {' and '.join(c for c in chose if c)} on {device.type}: {resolved.why}; "
              "set them explicitly to override", flush=True)


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
            resolve_precision(cfg, self.device, self.run_dir, log=distributed.world_from_env()[0] == 0)
            distributed.check(cfg, distributed.world_from_env()[1], self.device)  # before any process waits on another
            self.rank, self.world = distributed.init(self.device)
        else:
            if cfg.trainer.teacher_zero3:
                raise ConfigError(
                    "trainer.teacher_zero3 partitions the teacher with DeepSpeed: use it with trainer=zero2 or zero3"
                )
            self.device = pick_device(cfg.trainer.device)
            resolve_precision(cfg, self.device, self.run_dir)
            self.rank, self.world = 0, 1
        self.is_main = self.rank == 0
        check_resume_config(self.run_dir, cfg)
        check_output_folder(str(self.run_dir / "checkpoints"), "run_dir's checkpoints")
        torch.manual_seed(cfg.trainer.seed)

        with distributed.main_process_first(self.is_main):  # a teacher download lands in the cache once
            self.teacher: Teacher = load_teacher(cfg.teacher)
        # Training alone takes liger-kernel's rope (where installed, on CUDA): eval, rank, export and generate keep
        # transformers' own arithmetic, so that a student's scores are those an independent harness computes.
        use_fused_rope(self.teacher.config.model_type)
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
        if checkpoint is None and cfg.student.init_from:  # a resume loads its own weights
            line = init_from(self.student, cfg.student.init_from)
            if self.is_main:
                print(line, flush=True)
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
        engine = self._engine(name, stage, total)
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
        state.results.setdefault(name, {"first": [], "recent": []})  # the summary's losses (_record)
        t0, tokens0 = time.perf_counter(), state.tokens
        on_policy = None
        if stage.on_policy:
            on_policy = OnPolicy(stage.on_policy, stage.on_policy_tokens, stage.on_policy_temperature, cfg.trainer.seed)
        while state.step < total:
            position, batch = next(batches)
            batch = batch.to(self.device)
            written = on_policy is not None and on_policy.chosen(state.step)
            if written:
                batch = on_policy.sequences(self.student, batch, state.step)
            result, grad_norm = engine.step(batch)
            if on_policy is not None:
                result.extra["on_policy"] = float(written)
            state.step, state.position, state.tokens = state.step + 1, position, state.tokens + batch.numel()
            tok_s = (state.tokens - tokens0) / (time.perf_counter() - t0)
            self._record(name, total, result, grad_norm, engine, tok_s)
            bar.set_postfix(loss=f"{result.loss:.4g}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            every = cfg.trainer.checkpoint_every
            stopping = state.step < total and self.stop.pending(self.device)
            checkpoint = f"{name}-step{state.step:06d}"
            if stopping or (every and state.step % every == 0 and state.step < total):
                self._save(checkpoint, engine)
            if stopping:
                bar.close()
                engine.close()
                raise Stopped(self.stop.signum, f"in {name} at step {state.step} of {total}", checkpoint)
        bar.close()
        engine.steps_done()
        self.student.eval()
        if cfg.data.holdout_tokens:  # before the engine closes: under ZeRO-3 its hooks gather the weights
            state.results[name]["ppl"] = self.heldout(self.student)
            self.metrics.write({"event": "heldout", "stage": name, "student": state.results[name]["ppl"]})
        state.results[name]["tokens"] = state.tokens
        state.stage_done = True
        self._save(f"{name}-done", engine, optimizer=False)
        engine.close()

    def _engine(self, name: str, stage: StageConfig, total: int) -> step_engine.StepEngine:
        """The stage's step engine (step_engine.py) over its trainable parameters, the rest of the student frozen;
        resumed from the checkpoint's optimizer and schedule where the run stopped inside this stage."""
        params = list(trainable_parameters(self.student, stage.trainable).values())
        self.student.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        setup = step_engine.StepSetup(
            name, stage, self.student, self.teacher, params,
            schedule=lambda s: lr_factor(s, total, stage),
            precision=self.cfg.trainer.precision,
            device=self.device,
            check=lambda result: self._check_finite(name, result),
        )
        engine = step_engine.build(setup, self.cfg.trainer)
        saved = self.payload.get("optimizer") if self.payload is not None else None
        why = engine.restore(saved, self.checkpoint) if saved else None
        if why and self.is_main:
            print(f"{name}: resuming at step {self.state.step} with fresh optimizer moments ({why})", flush=True)
        return engine

    def _record(self, name: str, total: int, result, grad_norm, engine, tok_s: float) -> None:
        """A step's losses for the summary (single batches are noisy: it averages the first 3 and the last 3), and
        its metrics.jsonl row every trainer.log_every steps and at the stage's last."""
        state, record = self.state, self.state.results[name]
        if len(record["first"]) < 3:
            record["first"].append(result.loss)
        record["recent"] = [*record["recent"][-2:], result.loss]
        if state.step % self.cfg.trainer.log_every == 0 or state.step == total:
            self.metrics.write(
                {
                    "stage": name,
                    "stage_index": state.stage_index,
                    "step": state.step,
                    "tokens": state.tokens,
                    "loss": result.loss,
                    "lr": engine.lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tok_s,
                    "per_layer": result.per_layer,
                    **result.extra,
                }
            )
        record["last"] = result.loss
        record["per_layer"] = result.per_layer

    def _check_finite(self, stage: str, result) -> None:
        bad = [i for i, v in result.per_layer.items() if not math.isfinite(v)]
        if not math.isfinite(result.loss) or bad:
            where = f" in layer {bad[0]}" if bad else ""
            last = latest_checkpoint(self.run_dir)
            kept = (f"the latest checkpoint, {last}, is the last good one" if last is not None else
                    "no checkpoint had been written yet, so a new run starts from the beginning")
            raise NonFiniteLoss(
                f"{stage}: the loss is {result.loss} at step {self.state.step + 1}{where}; nothing of this step was "
                f"saved and {kept}. Lower stages.{stage}.lr or use trainer.precision=fp32"
            )

    def _save(self, name: str, engine: step_engine.StepEngine, optimizer: bool = True) -> None:
        """A checkpoint of the student and run state, written by the stage's engine with its optimizer and schedule
        (unless `optimizer` is False: at a stage's end the next stage starts its own)."""
        engine.save(self.run_dir, name, self.state, self.cfg.trainer.keep_checkpoints, optimizer)

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
