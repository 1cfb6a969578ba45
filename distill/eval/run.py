"""`distill eval`: score a run's student beside its teacher (or an export, or a teacher alone) with lm-eval."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ConfigError, EvalCommandConfig, check_output_folder, device_named, make_folder
from .harness import OFFLINE_GROUP, OFFLINE_TASKS, UnknownTask, check_tasks, evaluate, results_table, write_results
from .tasks.offline import DATA_DIR_ENV


def validate_eval(cfg: EvalCommandConfig) -> None:
    """Everything that can be refused before a model is loaded: numbers, precision, tasks and their data files."""
    for key in ("batch_size", "max_length", "rolling_tokens", "bootstrap_iters"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    if cfg.limit is not None and not cfg.limit > 0:
        raise ConfigError(f"limit={cfg.limit}: give documents per task (an integer) or a fraction in (0, 1)")
    if cfg.precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision={cfg.precision!r}: use bf16 or fp32")
    if cfg.out is not None:
        check_output_folder(str(Path(cfg.out).parent), "out's folder")
    if cfg.checkpoint is not None:
        from ..run_folder import is_run

        if not (is_run(cfg.checkpoint) or (Path(cfg.checkpoint) / "config.json").is_file()):
            raise ConfigError(
                f"checkpoint={cfg.checkpoint!r} is neither a run folder (config.yaml) nor an export (config.json)"
            )
    names = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    offline = any(n == OFFLINE_GROUP or n in OFFLINE_TASKS for n in names)
    if offline and not (cfg.data_dir or os.environ.get(DATA_DIR_ENV)):
        raise ConfigError(
            f"the offline tasks read local files: give data_dir=DIR (the folder of SOURCES.md, arc_easy/, ...) or "
            f"set {DATA_DIR_ENV}"
        )
    try:
        check_tasks(names, cfg.data_dir)
    except (FileNotFoundError, ValueError) as err:  # the harness's own words: which task, which file, what to set
        raise ConfigError(str(err)) from None


def _models(cfg: EvalCommandConfig) -> tuple[dict, object, Path]:
    """({column: model}, tokenizer, results stem) for the checkpoint or teacher named by cfg."""
    from ..models.teachers import load_teacher

    if cfg.checkpoint is None:
        teacher = load_teacher(cfg.teacher)
        return {"teacher": teacher.model}, teacher.tokenizer, Path(cfg.out or f"runs/eval/{cfg.teacher.name}")
    path = Path(cfg.checkpoint)
    from ..run_folder import is_run, locate

    if is_run(path):
        from ..run_folder import load_run

        run = load_run(path)
        models = {"teacher": run.teacher.model} if cfg.with_teacher else {}
        models["student"] = run.student
        # One checkpoint named in a run keeps its own results: RUN/eval/results.json stays the run's newest.
        named = locate(path)[1]
        stem = run.path / "eval" / ("results" if named is None else f"results-{named.name}")
        return models, run.teacher.tokenizer, Path(cfg.out or stem)
    if (path / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from safetensors import SafetensorError

        models = {}
        if cfg.with_teacher:
            models["teacher"] = load_teacher(cfg.teacher).model
        try:
            models["student"] = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, SafetensorError) as err:  # a damaged or partly copied export
            said = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"checkpoint={cfg.checkpoint!r} is an export that cannot be loaded ({said}): export "
                              "it again (`distill export`)") from None
        return models, tokenizer, Path(cfg.out or path / "eval" / "results")
    raise AssertionError("validate_eval lets only a run folder or an export through")


def run_eval(cfg: EvalCommandConfig) -> tuple[dict, str]:
    validate_eval(cfg)
    device = device_named(cfg.device, "device")
    models, tokenizer, stem = _models(cfg)
    columns = {}
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit
    for name, model in models.items():
        dtype = torch.bfloat16 if cfg.precision == "bf16" and device.type == "cuda" else torch.float32
        model.to(device=device, dtype=dtype).eval()
        try:
            columns[name] = evaluate(
                model,
                tokenizer,
                cfg.tasks,
                data_dir=cfg.data_dir,
                limit=limit,
                batch_size=cfg.batch_size,
                max_length=cfg.max_length,
                rolling_tokens=cfg.rolling_tokens,
                bootstrap_iters=cfg.bootstrap_iters,
            )
        except UnknownTask as err:  # found in lm-eval's task index, which only evaluate() builds
            raise ConfigError(str(err)) from None
        model.to("cpu")
    make_folder(stem.parent, "out's folder")
    write_results(stem, columns)
    return columns, results_table(columns)
