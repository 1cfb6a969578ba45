"""`distill eval` on a run folder: the student beside its teacher, written as JSON and Markdown."""

import json

import pytest

from distill.cli import main
from tests.test_eval import DATA_DIR

pytestmark = pytest.mark.skipif(not (DATA_DIR / "SOURCES.md").is_file(), reason=f"no offline eval data at {DATA_DIR}")


def test_eval_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "experiment=tiny", f"run_dir={run}", "pipeline=[stage1]", "stages.stage1.tokens=512"]) == 0
    args = ["eval", f"checkpoint={run}", "tasks=[distill_arc_easy,distill_wikitext]", "limit=2",
            f"data_dir={DATA_DIR}", "device=cpu", "batch_size=2", "max_length=128"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "teacher" in table and "student" in table and "word_perplexity" in table
    results = json.loads((run / "eval" / "results.json").read_text())
    for column in ("teacher", "student"):
        acc = results[column]["distill_arc_easy"]["acc"]
        ppl = results[column]["distill_wikitext"]["word_perplexity"]
        assert 0.0 <= acc <= 1.0 and ppl > 1.0
    assert (run / "eval" / "results.md").read_text().count("|") > 10


def test_eval_refuses_a_folder_that_is_neither(tmp_path, capsys):
    assert main(["eval", f"checkpoint={tmp_path}"]) == 2
    assert "neither a run folder" in capsys.readouterr().err
