"""`distill eval`: score a run's student beside its teacher (or an export, or a teacher alone) with lm-eval."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, EvalCommandConfig
from .harness import evaluate, results_table, write_results


def _models(cfg: EvalCommandConfig) -> tuple[dict, object, Path]:
    """({column: model}, tokenizer, results stem) for the checkpoint or teacher named by cfg."""
    from ..models.teachers import load_teacher

    if cfg.checkpoint is None:
        teacher = load_teacher(cfg.teacher)
        return {"teacher": teacher.model}, teacher.tokenizer, Path(cfg.out or f"runs/eval/{cfg.teacher.name}")
    path = Path(cfg.checkpoint)
    if (path / "config.yaml").exists():
        from ..run_folder import load_run

        run = load_run(path)
        models = {"teacher": run.teacher.model} if cfg.with_teacher else {}
        models["student"] = run.student
        return models, run.teacher.tokenizer, Path(cfg.out or path / "eval" / "results")
    if (path / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        models = {}
        if cfg.with_teacher:
            models["teacher"] = load_teacher(cfg.teacher).model
        models["student"] = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return models, tokenizer, Path(cfg.out or path / "eval" / "results")
    raise ConfigError(
        f"checkpoint={cfg.checkpoint!r} is neither a run folder (config.yaml) nor an export (config.json)"
    )


def run_eval(cfg: EvalCommandConfig) -> tuple[dict, str]:
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    models, tokenizer, stem = _models(cfg)
    columns = {}
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit
    for name, model in models.items():
        dtype = torch.bfloat16 if cfg.precision == "bf16" and device.type == "cuda" else torch.float32
        model.to(device=device, dtype=dtype).eval()
        columns[name] = evaluate(
            model,
            tokenizer,
            cfg.tasks,
            data_dir=cfg.data_dir,
            limit=limit,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
        )
        model.to("cpu")
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_results(stem, columns)
    return columns, results_table(columns)
