"""The attention budget (issue 18, section 2): quality against the number of attention layers a hybrid keeps, and
against its decode speed, from run folders that `distill eval` scored and a table of `bench/generate.py --out`.
No GPU: it reads files and draws.

    python bench/attention_budget.py --rows "0=bench/runs/pure_discrete_10min,3=bench/runs/choice_rank3,..." \
        [--decode FILE] [--prompt 8192] [--batch 64] [--out docs/attention_budget.png]

--rows: LAYERS=RUN pairs (LAYERS: how many attention layers the run's student keeps). --decode: generate.py's table;
each row is matched by its attention layers' count (the pure student's row for 0), at --prompt and --batch, on its
CUDA-graph steps where measured, else its eager steps (the legend says which). Prints the table it drew.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import report  # noqa: E402
from distill.compare import read_run  # noqa: E402

# SmolLM2-135M-Instruct's scores on the same offline tasks (../shared/device/README.md).
TEACHER = {"average": 44.0, "lambada": 29.2, "wikitext": 33.95}


def quality(run: str) -> dict:
    record = read_run(run)
    return {"average": record.average, "wikitext": record.wikitext, "lambada": record.lambada}


def decode_speeds(table: str, prompt: int, batch: int) -> dict[int, tuple[float, float, str]]:
    """{attention layers: (tokens/s, peak GB, path)} from generate.py's markdown table: the graph path where both."""
    found: dict[int, tuple[float, float, str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not cells[0].isdigit() or (int(cells[0]), int(cells[1])) != (prompt, batch):
            continue
        who, tok_s, gb = cells[2], cells[3], cells[5]
        if not tok_s.replace(".", "").isdigit():
            continue  # out of memory
        if who.startswith("student"):
            layers = 0
        elif (m := re.search(r"attention at \[([\d, ]*)\]", who)):
            layers = len([x for x in m.group(1).split(",") if x.strip()])
        else:
            continue
        path = "CUDA graphs" if "graph" in who else "eager"
        if layers not in found or path == "CUDA graphs":
            found[layers] = (float(tok_s), float(gb), path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True)
    parser.add_argument("--decode", default="")
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="docs/attention_budget.png")
    args = parser.parse_args()
    rows = sorted((int(k), v) for k, v in (pair.split("=", 1) for pair in args.rows.split(",")))
    scores = {layers: quality(run) for layers, run in rows}
    speeds = decode_speeds(Path(args.decode).read_text(), args.prompt, args.batch) if args.decode else {}

    lines = [f"| attention layers | 6-task average | LAMBADA acc | wikitext | decode tok/s ({args.prompt} x "
             f"{args.batch}) | peak GB | run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for layers, run in rows:
        s, d = scores[layers], speeds.get(layers)
        speed = f"{d[0]:.0f} ({d[2]})" if d else ""
        lines.append(f"| {layers} | {fmt(s['average'], '.2f')} | {fmt(s['lambada'], '.2f')} | "
                     f"{fmt(s['wikitext'], '.2f')} | {speed} | {fmt(d[1] if d else None, '.1f')} | {run} |")

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if speeds else 1, figsize=(11 if speeds else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    xs = [layers for layers, _ in rows]
    for key, label, marker in (("average", "6-task average", "o"), ("lambada", "LAMBADA acc", "s")):
        ax.plot(xs, [scores[x][key] for x in xs], marker=marker, label=label)
        ax.axhline(TEACHER[key], linestyle=":", color=ax.lines[-1].get_color(), linewidth=1)
    ax.set_xlabel("attention layers kept (of 30)")
    ax.set_ylabel("score (%); dotted: the teacher")
    ax.legend(loc="lower right")
    ax.set_title("quality against attention layers")
    if speeds:
        ax = axes[0][1]
        for x in xs:
            if x in speeds and scores[x]["average"] is not None:
                tok_s, _, path = speeds[x]
                ax.scatter(tok_s, scores[x]["average"], marker="o" if path == "CUDA graphs" else "x")
                ax.annotate(f"{x} ({path})", (tok_s, scores[x]["average"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.axhline(TEACHER["average"], linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"decode tokens/s, prompt {args.prompt}, batch {args.batch}")
        ax.set_ylabel("6-task average (%)")
        ax.set_title("quality against decode speed")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    report("\n".join(lines), None)


if __name__ == "__main__":
    main()
