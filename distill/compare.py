"""`distill compare`: several run folders side by side, for ablations and sweeps. One picture (each stage's mean loss
against the tokens it has seen, one line per run, and the held-out perplexity after each stage) and one table
(tokens per stage, held-out perplexity, and the lm-eval scores where `distill eval` wrote RUN/eval/results.json).

Everything is read from what the runs wrote (metrics.jsonl, eval/results.json): no model is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, check_output_folder, make_folder
from .eval.harness import benchmark_value, six_task_average, six_task_average_stderr
from .metrics_file import read_metrics


@dataclass
class RunRecord:
    label: str
    run_dir: Path
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # stage -> [(tokens in it, loss)]
    heldout: dict[str, float] = field(default_factory=dict)  # "teacher", "transfer", then each stage finished
    average: float | None = None  # 6-task average, percent
    average_stderr: float | None = None
    wikitext: float | None = None  # word perplexity
    lambada: float | None = None  # LAMBADA accuracy, percent (in-context recall)


def read_run(run_dir: str | Path, label: str | None = None) -> RunRecord:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl: give run folders that `distill train` wrote")
    record = RunRecord(label or run_dir.name, run_dir)
    for row in read_metrics(metrics):
        if "step" in row:
            curve = record.curves.setdefault(row["stage"], [])
            while curve and curve[-1][0] >= row["tokens"]:  # a resumed run logs its steps after the checkpoint again
                curve.pop()
            curve.append((int(row["tokens"]), float(row["loss"])))
        elif row.get("event") == "heldout":
            if "teacher" in row:
                record.heldout["teacher"] = float(row["teacher"])
            if "student_init" in row:
                record.heldout["transfer"] = float(row["student_init"])
            if "stage" in row and "student" in row:
                record.heldout[row["stage"]] = float(row["student"])
    results = run_dir / "eval" / "results.json"
    if results.is_file():
        try:
            column = json.loads(results.read_text()).get("student", {})
            if not isinstance(column, dict):
                raise ValueError("no student column")
        except (ValueError, AttributeError):
            raise ConfigError(
                f"{results} is damaged (not the JSON `distill eval` writes): run `distill eval` on {run_dir} again, "
                "or remove the file"
            ) from None
        record.average = six_task_average(column)
        record.average_stderr = six_task_average_stderr(column)
        record.wikitext = benchmark_value(column, "wikitext", "word_perplexity")
        lambada = benchmark_value(column, "lambada_openai", "acc")
        record.lambada = None if lambada is None else 100.0 * lambada
    return record


def _stages(records: list[RunRecord]) -> list[str]:
    """Every run's stage names, once: stage1, stage2, ... by number (a run of stage 3 alone may come first), then
    any other names in the order the runs met them."""
    names: list[str] = []
    for record in records:
        names += [name for name in list(record.curves) + list(record.heldout) if name not in ("teacher", "transfer")]
    names = list(dict.fromkeys(names))
    number = lambda n: int(n[5:]) if n.startswith("stage") and n[5:].isdigit() else 1 << 30
    return sorted(names, key=lambda n: (number(n), names.index(n)))


def _teacher_heldout(records: list[RunRecord]) -> float | None:
    return next((r.heldout["teacher"] for r in records if "teacher" in r.heldout), None)


def plot_runs(records: list[RunRecord], stages: list[str], path: Path) -> None:
    from .inspect import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.3 * (len(stages) + 1), 3.6), squeeze=False)
    colors = {id(r): f"C{i % 10}" for i, r in enumerate(records)}  # by run: two folders may share a name
    for ax, stage in zip(axes[0], stages):
        losses = []
        for record in records:
            curve = record.curves.get(stage)
            if curve:
                ax.plot([t / 1e6 for t, _ in curve], [v for _, v in curve], color=colors[id(record)], lw=1.3,
                        label=record.label)
                losses += [v for _, v in curve if v > 0]
        if losses and max(losses) / min(losses) > 30:
            ax.set_yscale("log")
        ax.set_title(f"{stage}: mean loss")
        ax.set_xlabel("tokens in the stage (M)")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    points = ["transfer"] + stages
    for record in records:
        xs = [i for i, p in enumerate(points) if p in record.heldout]
        ax.plot(xs, [record.heldout[points[i]] for i in xs], marker="o", color=colors[id(record)],
                label=record.label)
    teacher = _teacher_heldout(records)
    if teacher is not None:
        ax.axhline(teacher, color="black", ls="--", lw=1, label="teacher")
    ax.set_yscale("log")
    ax.set_xticks(range(len(points)), ["transfer"] + [f"after {s}" for s in stages], fontsize=7)
    ax.set_title("held-out perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(records: list[RunRecord], stages: list[str]) -> str:
    teacher = _teacher_heldout(records)
    lines = [
        f"| run | tokens: {' / '.join(stages)} | held-out perplexity: transfer / after {' / '.join(stages)} "
        "| 6-task average (± s.e.) | wikitext word ppl |",
        "|---|---|---|---|---|",
    ]
    for r in records:  # "-": the run has no such stage
        tokens = " / ".join(f"{r.curves[s][-1][0] / 1e6:.3g}M" if s in r.curves else "-" for s in stages)
        ppl = " / ".join(f"{r.heldout[p]:,.2f}" if p in r.heldout else "-" for p in ["transfer"] + stages)
        average = "" if r.average is None else f"{r.average:.2f}"
        if r.average is not None and r.average_stderr is not None:
            average += f" ± {r.average_stderr:.2f}"
        wikitext = "" if r.wikitext is None else f"{r.wikitext:,.2f}"
        lines.append(f"| {r.label} | {tokens} | {ppl} | {average} | {wikitext} |")
    head = f"Stages: {', '.join(stages)}." + (f" Teacher's held-out perplexity: {teacher:.2f}." if teacher else "")
    return head + "\n\n" + "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[str], out_dir: str | Path, labels: list[str] | None = None) -> Path:
    """Write compare.png and compare.md into out_dir; return out_dir."""
    if not run_dirs:
        raise ConfigError("runs=[] is empty: list run folders, e.g. runs=[runs/abl_123,runs/abl_23]")
    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"labels= has {len(labels)} names for {len(run_dirs)} runs: give one per run, or none")
    check_output_folder(str(out_dir), "out")
    if labels is None:  # the folders' names, or their paths where two names are the same
        names = [Path(d).name for d in run_dirs]
        labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]
    records = [read_run(d, label) for d, label in zip(run_dirs, labels)]
    out = make_folder(out_dir, "out")
    stages = _stages(records)
    plot_runs(records, stages, out / "compare.png")
    (out / "compare.md").write_text(table(records, stages) + "\n![loss curves and held-out perplexity](compare.png)\n")
    return out
