"""Evaluate a model with lm-eval on the offline task twins (and any lm-eval task), and tabulate the results.

    from distill.eval.harness import OFFLINE_TASKS, evaluate, write_results
    teacher = evaluate(teacher_model, tokenizer, OFFLINE_TASKS, data_dir="/work/shared/data")
    student = evaluate(student_model, tokenizer, OFFLINE_TASKS, data_dir="/work/shared/data")
    write_results("runs/eval/results", {"teacher": teacher, "student": student})

The twins (`distill_<lm-eval name>`, YAMLs in distill/eval/tasks/) keep lm-eval's prompts, targets and metrics
but read local files, so they run without the Hugging Face hub. lm-eval is imported only when `evaluate` runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distill.eval.tasks import TASKS_DIR
from distill.eval.tasks.offline import DATA_DIR_ENV, REQUIRED_FILES, missing_files, resolve_data_dir

OFFLINE_GROUP = "distill_offline"
OFFLINE_TASKS: tuple[str, ...] = (
    "distill_lambada_openai",
    "distill_hellaswag",
    "distill_piqa",
    "distill_arc_easy",
    "distill_arc_challenge",
    "distill_winogrande",
    "distill_wikitext",
)

# The headline metric(s) of each task, for the twins and for the lm-eval tasks they copy.
_HEADLINE: dict[str, tuple[str, ...]] = {
    "lambada_openai": ("acc", "perplexity"),
    "hellaswag": ("acc_norm",),
    "piqa": ("acc",),
    "arc_easy": ("acc",),
    "arc_challenge": ("acc_norm",),
    "winogrande": ("acc",),
    "wikitext": ("word_perplexity",),
}
TASK_METRICS: dict[str, tuple[str, ...]] = {
    **{f"distill_{name}": metrics for name, metrics in _HEADLINE.items()},
    **_HEADLINE,
}

# The usual zero-shot average of distillation papers: six accuracies, in percent.
AVERAGE_OF: tuple[tuple[str, str], ...] = (
    ("lambada_openai", "acc"),
    ("hellaswag", "acc_norm"),
    ("piqa", "acc"),
    ("arc_easy", "acc"),
    ("arc_challenge", "acc_norm"),
    ("winogrande", "acc"),
)
_PERCENT_METRICS = {"acc", "acc_norm"}

# evaluate()'s result holds lm-eval's own output under this key, beside one {metric: value} dict per task.
RAW_KEY = "lm_eval"


# --------------------------------------------------------------------------------------------- evaluate
def _task_list(tasks: str | Sequence[str]) -> list[str]:
    """Names in order, without repeats; a comma-separated string and the group name are accepted."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    expanded: list[str] = []
    for name in (n.strip() for n in names):
        for task in OFFLINE_TASKS if name == OFFLINE_GROUP else (name,):
            if task and task not in expanded:
                expanded.append(task)
    if not expanded:
        raise ValueError(f"no tasks given: name some of {', '.join(OFFLINE_TASKS)} or lm-eval tasks")
    return expanded


def _check_data_files(offline: list[str], data_dir: str | os.PathLike | None) -> Path:
    root = resolve_data_dir(data_dir)
    for task in offline:
        missing = missing_files(task, root)
        if missing:
            raise FileNotFoundError(
                f"{task} needs {missing[0]}, which is missing: set data_dir (or {DATA_DIR_ENV}) to the folder "
                f"holding {', '.join(REQUIRED_FILES[task])} (see SOURCES.md of the offline data)"
            )
    return root


def check_tasks(tasks: str | Sequence[str], data_dir: str | os.PathLike | None = None) -> tuple[list[str], dict]:
    """The task names, and lm-eval's metadata for the twins, once what can be checked without lm-eval's task index
    is: names given, the twins' prefix not misused, the twins' data files there (ValueError, FileNotFoundError)."""
    names = _task_list(tasks)
    offline = [name for name in names if name in OFFLINE_TASKS]
    for name in names:  # the prefix is reserved for the twins: fail before indexing lm-eval's tasks
        if name not in OFFLINE_TASKS and name.startswith("distill_"):
            raise _unknown_task(name)
    return names, ({"data_dir": str(_check_data_files(offline, data_dir))} if offline else {})


class UnknownTask(ValueError):
    """A task name neither a twin nor in lm-eval's index."""


def _unknown_task(name: str) -> UnknownTask:
    twin = f" (offline twin: distill_{name})" if f"distill_{name}" in OFFLINE_TASKS else ""
    return UnknownTask(
        f"unknown task {name!r}{twin}: use one of {', '.join(OFFLINE_TASKS)} or a name from `lm-eval ls tasks`"
    )


def _check_known(names: list[str], task_manager: Any) -> None:
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known and not Path(name).is_file():
            raise _unknown_task(name)


def headline_metrics(task: str, task_results: Mapping[str, Any]) -> dict[str, float]:
    """{metric: value} of a task's headline metrics (all its metrics for tasks not in TASK_METRICS)."""
    metrics = TASK_METRICS.get(task)
    if metrics is None:  # any other lm-eval task: every unfiltered numeric metric but the standard errors
        metrics = tuple(
            key.removesuffix(",none")
            for key, value in task_results.items()
            if key.endswith(",none") and "_stderr" not in key and isinstance(value, (int, float))
        )
    return {m: float(task_results[f"{m},none"]) for m in metrics if f"{m},none" in task_results}


def _lm(model: Any, tokenizer: Any, batch_size: int, max_length: int, rolling_tokens: int | None) -> Any:
    """lm-eval's HFLM around `model`, with perplexity tasks' full windows (wikitext's rolling loglikelihood) batched
    at most `rolling_tokens` tokens at a time. lm-eval batches those `batch_size` windows of max_length each, and
    their logits and float32 log-softmax over the vocabulary (77 GB at 128 x 2048 x 49,152) would otherwise cap the
    batch size of every short-context task, where larger batches pay most (fewer forwards of a launch-bound model)."""
    from lm_eval.models.huggingface import HFLM

    class CappedRollingLM(HFLM):
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            if rolling_tokens is None:
                return super().loglikelihood_rolling(requests, disable_tqdm)
            full = self.batch_size_per_gpu
            self.batch_size_per_gpu = max(1, min(full, rolling_tokens // self.max_length))
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm)
            finally:
                self.batch_size_per_gpu = full

    return CappedRollingLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str | None = None,
    rolling_tokens: int | None = 32768,
    bootstrap_iters: int = 1000,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval on `model` (a transformers causal LM) and return {task: {metric: value}} plus RAW_KEY.

    tasks: offline twins (OFFLINE_TASKS, or OFFLINE_GROUP for all seven) and/or any lm-eval task names (those
        download their data from the hub). data_dir: folder of the twins' files, else $DISTILL_DATA_DIR.
    limit: documents per task (an int) or a fraction (a float < 1); None evaluates everything.
    device: where to move the model first; None leaves it where it is (lm-eval then uses model.device).
    rolling_tokens: tokens a batch of perplexity windows may hold (wikitext: rolling_tokens // max_length windows
        of max_length), whatever batch_size; None: batch_size windows.
    bootstrap_iters: draws for the standard errors lm-eval bootstraps (LAMBADA's perplexity among the twins; the
        accuracies' come in closed form). lm-eval's default of 100,000 ran at ~1.9 s a 1,000 on a 2-core CPU after
        the forwards (AMD EPYC, AVX2, 2026-12-04: 36 of its 100 rounds in 67 s, ~3 minutes in all), longer than a
        small student's forwards on a GPU; 1,000 estimate an error that no table shows to a few percent (lm-eval
        spreads the rounds over the host's cores). Must be positive: 0 drops every standard error.
    simple_evaluate_kwargs: passed on to lm_eval.simple_evaluate (e.g. num_fewshot).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names, metadata = check_tasks(tasks, data_dir)
    others = [name for name in names if name not in OFFLINE_TASKS]
    # Indexing lm-eval's own ~15k task files takes seconds; skip it when only the twins are asked for.
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(others), metadata=metadata)
    _check_known(others, task_manager)

    if device is not None:
        model = model.to(device)
    lm = _lm(model, tokenizer, batch_size, max_length, rolling_tokens)
    options = {"log_samples": False, "bootstrap_iters": bootstrap_iters, **simple_evaluate_kwargs}
    raw = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=task_manager, **options)

    results: dict[str, Any] = {name: headline_metrics(name, raw["results"].get(name, {})) for name in names}
    results[RAW_KEY] = raw
    return results


# --------------------------------------------------------------------------------------------- tables
def _metric_rows(columns: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(task, metric) pairs in first-seen order across the columns, headline order within a task."""
    rows: list[tuple[str, str]] = []
    for column in columns.values():
        for task, metrics in column.items():
            if task == RAW_KEY or not isinstance(metrics, Mapping):
                continue
            order = TASK_METRICS.get(task, ())
            for metric in sorted(metrics, key=lambda m: (order.index(m) if m in order else len(order), m)):
                if (task, metric) not in rows:
                    rows.append((task, metric))
    return rows


def _value(column: Mapping[str, Any], task: str, metric: str) -> float | None:
    metrics = column.get(task)
    value = metrics.get(metric) if isinstance(metrics, Mapping) else None
    return None if value is None else float(value)


def benchmark_value(column: Mapping[str, Any], benchmark: str, metric: str) -> float | None:
    """A benchmark's metric from its offline twin, else from its lm-eval task."""
    twin = _value(column, f"distill_{benchmark}", metric)
    return twin if twin is not None else _value(column, benchmark, metric)


def six_task_average(column: Mapping[str, Any]) -> float | None:
    """Mean of the AVERAGE_OF accuracies in percent; None unless all six are present."""
    values = [benchmark_value(column, benchmark, metric) for benchmark, metric in AVERAGE_OF]
    if any(value is None for value in values):
        return None
    return 100.0 * sum(values) / len(values)  # type: ignore[arg-type]


def six_task_average_stderr(column: Mapping[str, Any]) -> float | None:
    """Standard error of six_task_average in percent, from lm-eval's per-task standard errors (the six test sets
    are independent: sqrt of the summed variances over 6); None unless evaluate()'s raw output holds all six."""
    results = column.get(RAW_KEY, {}).get("results", {}) if isinstance(column.get(RAW_KEY), Mapping) else {}
    variances = []
    for benchmark, metric in AVERAGE_OF:
        task = results.get(f"distill_{benchmark}", results.get(benchmark, {}))
        stderr = task.get(f"{metric}_stderr,none") if isinstance(task, Mapping) else None
        if not isinstance(stderr, (int, float)):  # lm-eval writes "N/A" where it has none
            return None
        variances.append(float(stderr) ** 2)
    return 100.0 * sum(variances) ** 0.5 / len(variances)


def _shown(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    if metric in _PERCENT_METRICS:
        return f"{100.0 * value:.2f}"
    if metric == "bits_per_byte":
        return f"{value:.4f}"
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3e}"  # an untrained model's perplexity is huge


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "—"
    return f"{numerator / denominator:.3f}"


def results_table(columns: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table: one row per task and metric, one column per model, then the six-task average.

    columns: {model name: evaluate() result or any {task: {metric: value}}}, e.g. {"teacher": t, "student": s}.
    Accuracies are shown in percent. With exactly two columns a third gives second / first (student / teacher
    when the teacher comes first), for the average row as well.
    """
    names = list(columns)
    with_ratio = len(names) == 2

    def row(task: str, label: str, shown: list[str], values: list[float | None]) -> str:
        cells = [task, label, *shown] + ([_ratio(values[1], values[0])] if with_ratio else [])
        return "| " + " | ".join(cells) + " |"

    header = ["task", "metric", *names] + ([f"{names[1]}/{names[0]}"] if with_ratio else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, metric in _metric_rows(columns):
        values = [_value(columns[name], task, metric) for name in names]
        label = f"{metric} (%)" if metric in _PERCENT_METRICS else metric
        lines.append(row(task, label, [_shown(metric, v) for v in values], values))
    averages = [six_task_average(columns[name]) for name in names]
    shown = ["—" if a is None else f"{a:.2f}" for a in averages]
    lines.append(row("average (6 tasks)", "acc (%)", shown, averages))
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    # lm-eval's raw output holds numpy scalars, dtypes and functions; keep numbers as numbers, the rest as text.
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def write_results(path_stem: str | os.PathLike, columns: Mapping[str, Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write `<stem>.json` (every column, lm-eval's raw output included) and `<stem>.md` (results_table)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    json_path.write_text(json.dumps(columns, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    md_path.write_text(results_table(columns), encoding="utf-8")
    return json_path, md_path
