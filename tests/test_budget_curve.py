"""bench/budget_curve.py: fake run folders whose scores (wikitext: its log10) lie on exact lines in log10(tokens);
the tokens it extrapolates to each goal are the analytic ones, a series moving away from its goal reads "never",
and a hybrid's tokens include its student.init_from run's."""

import importlib.util
import json
import math
from pathlib import Path

from distill.eval.harness import AVERAGE_OF

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "budget_curve.py"


def _script():
    spec = importlib.util.spec_from_file_location("budget_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(run_dir, stages, average, lambada, wikitext, init_from=None):
    """A run folder as `distill train` and `distill eval` leave it: metrics.jsonl (steps of each stage, the last at
    its tokens), config.yaml, eval/results.json with the six tasks averaging `average` (percent)."""
    run_dir.mkdir(parents=True)
    rows = [{"event": "heldout", "teacher": 20.0, "student_init": 30.0}]
    for stage, tokens in stages.items():
        rows += [{"stage": stage, "step": s, "tokens": tokens * s // 4, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    student = f"{{form: discrete, init_from: '{init_from}'}}" if init_from else "{form: discrete}"
    (run_dir / "config.yaml").write_text(f"teacher:\n  name: tiny-llama\nstudent: {student}\n")
    others = (6 * average / 100 - lambada / 100) / 5  # the other five tasks' accuracy: the six average to `average`
    column = {f"distill_{b}": {m: lambada / 100 if b == "lambada_openai" else others} for b, m in AVERAGE_OF}
    column["distill_wikitext"] = {"word_perplexity": wikitext}
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text(json.dumps({"student": column}))
    return str(run_dir)


def test_budget_curve_extrapolates_exact_lines(tmp_path, capsys):
    line = lambda a, b, t: a + b * math.log10(t)  # noqa: E731
    pure, hybrid, worse = [], [], []
    for tokens in (2e6, 8e6, 3.2e7):  # pure: one stage 3 of these tokens
        t = int(tokens)
        pure.append(_run(tmp_path / f"pure_{t}", {"stage3": t}, line(10, 4, t), line(-20, 5, t),
                         10 ** line(4.5, -0.4, t)))
    # Hybrids: stage 3 from one pure stages 1-2 run of 1e6 tokens (student.init_from), so totals 1e6 + stage 3's.
    s12 = _run(tmp_path / "s12", {"stage1": 400_000, "stage2": 600_000}, 1.0, 1.0, 1e4)
    for tokens in (4e6, 1.6e7):
        t, total = int(tokens), int(tokens) + 1_000_000
        hybrid.append(_run(tmp_path / f"hyb_{t}", {"stage3": t}, line(5, 5, total), line(-10, 4, total),
                           10 ** line(4.0, -0.35, total), init_from=f"{s12}/checkpoints/step_3"))
    for tokens in (1e6, 1e7):  # quality falling with tokens: never
        worse.append(_run(tmp_path / f"worse_{int(tokens)}", {"stage3": int(tokens)}, 40 - math.log10(tokens),
                          30 - math.log10(tokens), 30 + math.log10(tokens)))
    out, table = tmp_path / "curve.png", tmp_path / "curve.md"
    reach = _script().main([
        "--series", f"pure={','.join(pure)};hybrid={','.join(hybrid)}", "--runs", ",".join(worse),
        "--teacher-average", "44.0", "--teacher-lambada", "29.2", "--teacher-wikitext", "33.95",
        "--goal-lambada", "26.3", "--goal-wikitext", "37.3", "--out", str(out), "--table", str(table)])
    goals = {"average": 0.95 * 44.0, "lambada": 26.3, "wikitext": 37.3}
    lines = {"pure": {"average": (10, 4), "lambada": (-20, 5), "wikitext": (4.5, -0.4)},
             "hybrid": {"average": (5, 5), "lambada": (-10, 4), "wikitext": (4.0, -0.35)}}
    for series, metrics in lines.items():
        for key, (a, b) in metrics.items():
            goal = math.log10(goals[key]) if key == "wikitext" else goals[key]  # perplexity: a power law
            expected = 10 ** ((goal - a) / b)
            assert abs(reach[series][key] / expected - 1) < 1e-6, (series, key, reach[series][key], expected)
    assert reach["runs"] == {"average": None, "lambada": None, "wikitext": None}
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = capsys.readouterr().out
    assert printed.strip() == table.read_text().strip()
    assert f"| hybrid | {hybrid[0]} | 5e+06 |" in printed  # 4e6 of stage 3 + 1e6 of s12's stages 1-2
    assert f"| pure | average | >= 41.80 | +4.000 | 3 | {10 ** ((41.8 - 10) / 4):.3g} |" in printed
    assert printed.count("| never |") == 3
