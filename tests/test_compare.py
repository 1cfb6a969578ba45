"""`distill compare`: two tiny runs side by side; the table's figures are the runs' own, the picture is drawn."""

import json
import math
import random
import re

import pytest

from distill.cli import main
from distill.compare import read_run
from distill.config import ConfigError
from distill.eval.harness import AVERAGE_OF, RAW_KEY


def _eval_results(run_dir, rng):
    """An eval/results.json in `distill eval`'s shape, with fresh random scores and standard errors."""
    column, raw = {}, {}
    for benchmark, metric in AVERAGE_OF:
        value, stderr = rng.uniform(0.2, 0.7), rng.uniform(0.002, 0.02)
        column[f"distill_{benchmark}"] = {metric: value}
        raw[f"distill_{benchmark}"] = {f"{metric},none": value, f"{metric}_stderr,none": stderr}
    column["distill_wikitext"] = {"word_perplexity": rng.uniform(30, 300)}
    column[RAW_KEY] = {"results": raw}
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text(json.dumps({"student": column}))
    return column


def test_compare_two_runs(tmp_path, capsys):
    full, late = tmp_path / "full", tmp_path / "late"
    assert main(["train", "experiment=tiny", f"run_dir={full}", "stages.stage1.tokens=512",
                 "stages.stage2.tokens=512", "stages.stage3.tokens=1024", "trainer.log_every=1"]) == 0
    assert main(["train", "experiment=tiny", f"run_dir={late}", "pipeline=[stage3]",
                 "stages.stage3.tokens=1024", "trainer.log_every=1"]) == 0
    rng = random.Random()
    column = _eval_results(full, rng)
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", f"runs=[{full},{late}]", "labels=[1+2+3,3 only]", f"out={out}"]) == 0
    assert "picture and table in" in capsys.readouterr().out
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = (out / "compare.md").read_text()
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([^|]+?) \| ([^|]+) \| ([^|]+) \| ([^|]*) \| ([^|]*) \|$", table,
                                           flags=re.MULTILINE)}
    assert set(rows) >= {"1+2+3", "3 only"}
    assert rows["1+2+3"][0] == "0.000512M / 0.000512M / 0.00102M" and rows["3 only"][0] == "- / - / 0.00102M"
    # Held-out perplexities are the runs' own (metrics.jsonl), in order: transfer, then after each stage.
    for label, run in (("1+2+3", full), ("3 only", late)):
        events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        logged = {e.get("stage", "transfer"): e.get("student", e.get("student_init"))
                  for e in events if e.get("event") == "heldout"}
        shown = rows[label][1].split(" / ")
        for name, cell in zip(["transfer", "stage1", "stage2", "stage3"], shown):
            if name in logged:
                assert abs(float(cell.replace(",", "")) - logged[name]) <= 0.006, (label, name)
            else:
                assert cell == "-"
    # The average and its standard error, computed here independently of the harness.
    values = [column[f"distill_{b}"][m] for b, m in AVERAGE_OF]
    errors = [column[RAW_KEY]["results"][f"distill_{b}"][f"{m}_stderr,none"] for b, m in AVERAGE_OF]
    average, stderr = 100 * sum(values) / 6, 100 * math.sqrt(sum(e * e for e in errors)) / 6
    assert rows["1+2+3"][2] == f"{average:.2f} ± {stderr:.2f}"
    assert rows["1+2+3"][3] == f"{column['distill_wikitext']['word_perplexity']:,.2f}"
    assert rows["3 only"][2] == "" and rows["3 only"][3] == ""  # no eval results: blank, not made up


def test_read_run_keeps_the_resumed_steps(tmp_path):
    """A resumed run logs again the steps after its checkpoint: the curve keeps the later ones, in token order."""
    rows = [{"stage": "stage3", "step": s, "tokens": 100 * s, "loss": 5.0 - s} for s in (1, 2, 3)]
    rows += [{"stage": "stage3", "step": s, "tokens": 100 * s, "loss": 1.0 / s} for s in (2, 3, 4)]  # resumed at 1
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curve = read_run(tmp_path).curves["stage3"]
    assert curve == [(100, 4.0), (200, 0.5), (300, 1.0 / 3), (400, 0.25)]


def test_compare_errors_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("")
    from distill.compare import compare_runs

    with pytest.raises(ConfigError, match="one per run"):
        compare_runs([str(tmp_path / "a")], tmp_path / "out", labels=["x", "y"])
    assert main(["compare", "runs=[]"]) == 2


def test_same_folder_names_get_their_paths_as_labels(tmp_path):
    from distill.compare import compare_runs

    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for n, run in enumerate(runs):
        run.mkdir(parents=True)
        rows = [{"stage": "stage3", "step": s, "tokens": 64 * s, "loss": 2.0 / s + n} for s in (1, 2)]
        rows.append({"event": "heldout", "stage": "stage3", "student": 40.0 + n})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = (compare_runs([str(r) for r in runs], tmp_path / "out") / "compare.md").read_text()
    assert f"| {runs[0]} |" in table and f"| {runs[1]} |" in table
    assert "| 40.00 |" not in table and "- / 40.00 |" in table and "- / 41.00 |" in table
