"""The budget curve (issue 18, section 4): quality against training tokens, one line per series of run folders that
`distill eval` scored, and where a straight line in log10(tokens) says each series reaches its goal. No GPU: it
reads files and draws.

    python bench/budget_curve.py --series "pure=bench/runs/pure_5min,bench/runs/pure_10min,bench/runs/pure_20min;\
hybrid=bench/runs/hyb3_10min,bench/runs/hyb3_20min" [--runs DIR,DIR] [--teacher-average 44.0] \
        [--teacher-lambada 29.2] [--teacher-wikitext 33.95] [--goal-lambada 17.5] [--goal-wikitext 44.1] \
        [--out docs/budget_curve.png] [--table FILE]

--series: NAME=RUN,RUN,... groups separated by ';' (--runs: one more group, named "runs"). A run's tokens are the
tokens of every stage it trained (each stage's last logged step) plus, where its config.yaml names
student.init_from, that run's total (a hybrid's stage 3 from a pure student's stages 1-2; the path as trained, else
a folder of that name beside the run). Goals: 95% of the teacher's 6-task average, LAMBADA acc >= --goal-lambada,
wikitext word perplexity <= --goal-wikitext (defaults: issue 18's goals for a hybrid with at most 3 attention
layers). For each series and metric, a least-squares line of the metric (wikitext: its log10) against log10(tokens) over
the series' runs (2 or more) gives the tokens where it meets the goal; "never" where the line moves away from it.
Prints the table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.attention_budget import TEACHER, quality  # noqa: E402
from bench.common import report  # noqa: E402
from distill.compare import read_run  # noqa: E402
from distill.config import ConfigError, read_run_config  # noqa: E402

# (key, label, +1 where higher is better, whether the line is fitted to the metric's log10: perplexity falls as a
# power of the tokens, so a straight line in log-log; a line in perplexity itself overshoots below the teacher)
METRICS = (("average", "6-task average (%)", 1, False), ("lambada", "LAMBADA acc (%)", 1, False),
           ("wikitext", "wikitext word perplexity", -1, True))


def total_tokens(run: str | Path) -> int:
    """Tokens the run's student was trained on, its student.init_from run's included."""
    run = Path(run)
    tokens = sum(curve[-1][0] for curve in read_run(run).curves.values())  # the trainer logs each stage's last step
    if not (run / "config.yaml").is_file():
        print(f"{run} has no config.yaml: its own stages' tokens only (a student.init_from run would be missed)",
              file=sys.stderr)
    source = read_run_config(run).student.get("init_from") if (run / "config.yaml").is_file() else ""
    if source:
        source = Path(source)
        source = source.parent.parent if source.parent.name == "checkpoints" else source  # RUN/checkpoints/NAME
        if not (source / "metrics.jsonl").is_file():  # a path from where it trained: the runs copied side by side
            source = run.parent / source.name
        if not (source / "metrics.jsonl").is_file():
            raise ConfigError(f"{run}'s student.init_from names a run folder found neither from here nor beside it: "
                              "run this from the folder the run was trained in, or copy that run beside it")
        tokens += total_tokens(source)
    if tokens <= 0:
        raise ConfigError(f"{run} logged no training steps: give runs that `distill train` trained")
    return tokens


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line of the metric against log10(tokens); None under 2 token counts."""
    xs, ys = [math.log10(t) for t, _ in points], [v for _, v in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def tokens_to_goal(line: tuple[float, float], goal: float, better: int) -> float | None:
    """Tokens where the line meets `goal`; None ("never") where its slope has the wrong sign (or is flat)."""
    intercept, slope = line
    if slope * better <= 0:
        return None
    try:
        return 10.0 ** ((goal - intercept) / slope)
    except OverflowError:
        return math.inf


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default="")
    parser.add_argument("--runs", default="")
    parser.add_argument("--teacher-average", type=float, default=TEACHER["average"])
    parser.add_argument("--teacher-lambada", type=float, default=TEACHER["lambada"])
    parser.add_argument("--teacher-wikitext", type=float, default=TEACHER["wikitext"])
    parser.add_argument("--goal-lambada", type=float, default=17.5)
    parser.add_argument("--goal-wikitext", type=float, default=44.1)
    parser.add_argument("--out", default="docs/budget_curve.png")
    parser.add_argument("--table", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    groups = [g.split("=", 1) for g in args.series.split(";") if g.strip()]
    groups += [["runs", args.runs]] if args.runs else []
    if not groups or any(len(g) != 2 for g in groups):
        parser.error('give --series "NAME=RUN,RUN;NAME=RUN,..." and/or --runs RUN,RUN')
    series = {name.strip(): [r.strip() for r in runs.split(",") if r.strip()] for name, runs in groups}
    teacher = {"average": args.teacher_average, "lambada": args.teacher_lambada, "wikitext": args.teacher_wikitext}
    goals = {"average": 0.95 * args.teacher_average, "lambada": args.goal_lambada, "wikitext": args.goal_wikitext}

    points = {name: sorted(((total_tokens(run), quality(run), run) for run in runs), key=lambda p: p[0])
              for name, runs in series.items()}
    reach: dict[str, dict[str, float | None]] = {}  # series -> metric -> tokens to the goal (None: never)
    lines: dict[tuple[str, str], tuple[float, float]] = {}
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    rows = ["| series | run | tokens | 6-task average | LAMBADA acc | wikitext |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, pts in points.items():
        rows += [f"| {name} | {run} | {t:.3g} | {fmt(s['average'], '.2f')} | {fmt(s['lambada'], '.2f')} | "
                 f"{fmt(s['wikitext'], '.2f')} |" for t, s, run in pts]
    rows += ["", f"Tokens to the goal, from a line in log10(tokens) (teacher: average {args.teacher_average:g}, "
             f"LAMBADA {args.teacher_lambada:g}, wikitext {args.teacher_wikitext:g}):", "",
             "| series | metric | goal | slope per 10x tokens | runs fitted | tokens to the goal |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, pts in points.items():
        reach[name] = {}
        for key, label, better, logged in METRICS:
            have = [(t, math.log10(s[key]) if logged else s[key]) for t, s, _ in pts if s[key] is not None]
            line = fit(have)
            goal = f"{'>=' if better > 0 else '<='} {goals[key]:.2f}"
            if line is None:
                rows.append(f"| {name} | {key} | {goal} | | {len(have)} | too few token counts |")
                continue
            lines[name, key] = line
            reach[name][key] = t = tokens_to_goal(line, math.log10(goals[key]) if logged else goals[key], better)
            slope = f"x{10 ** line[1]:.3f}" if logged else f"{line[1]:+.3f}"
            rows.append(f"| {name} | {key} | {goal} | {slope} | {len(have)} | "
                        f"{'never' if t is None else f'{t:.3g}'} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label, _, logged) in zip(axes, METRICS):
        for i, (name, pts) in enumerate(points.items()):
            have = [(t, s[key]) for t, s, _ in pts if s[key] is not None]
            if have:
                ax.plot(*zip(*have), marker="o", linestyle="none", color=f"C{i}", label=name)
            if (name, key) in lines:
                (a, b), xs = lines[name, key], [have[0][0], have[-1][0]]
                at_goal = reach[name].get(key)
                if at_goal is not None and have[-1][0] < at_goal <= 1e12:
                    xs.append(at_goal)  # the extrapolation, dashed, to where the line meets the goal
                ys = [a + b * math.log10(x) for x in xs]
                ys = [10 ** y for y in ys] if logged else ys
                ax.plot(xs[:2], ys[:2], color=f"C{i}", linewidth=1)
                if len(xs) == 3:
                    ax.plot(xs[1:], ys[1:], color=f"C{i}", linewidth=1, linestyle="--")
                    ax.annotate(f"{at_goal:.2g}", (xs[2], ys[2]), textcoords="offset points", xytext=(4, 4),
                                fontsize=8, color=f"C{i}")
        ax.axhline(teacher[key], color="black", linestyle="--", linewidth=1, label="teacher")
        ax.axhline(goals[key], color="gray", linestyle=":", linewidth=1, label="goal")
        ax.set_xscale("log")
        if logged:
            ax.set_yscale("log")  # the fitted power law is a straight line here
        ax.set_xlabel("training tokens")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    report("\n".join(rows), args.table)
    return reach


if __name__ == "__main__":
    main()
