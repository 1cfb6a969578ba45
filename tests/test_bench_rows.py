"""Every row of bench/quality.sh composes into a valid training config, at its budget and at the ten-minute one: a
row with a misspelt or refused override fails here, on the CPU, not after a GPU lease has started."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from distill.cli import compose
from distill.config import validate

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quality.sh"


def _rows() -> list[str]:
    text = SCRIPT.read_text()
    body = text[text.index("overrides() {"):]
    body = body[: body.index("\n}\n")]
    return [name for line in re.findall(r"^\s+([a-z0-9_ |]+)\)", body, re.M) for name in line.replace(" ", "").split("|")]


ROWS = _rows()


def _overrides(row: str) -> list[str]:
    """The row's overrides as the script's own `overrides` function gives them."""
    text = SCRIPT.read_text()
    function = text[text.index("overrides() {"):]
    function = function[: function.index("\n}\n") + 3]
    out = subprocess.run(["bash", "-c", f'RUNS=runs\n{function}\noverrides "$1"', "_", row],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_the_rows_are_found():
    assert {"pure_discrete", "recipe_s12", "recipe_base", "recipe_recall", "recipe_on_policy"} <= set(ROWS)


@pytest.mark.parametrize("row", [r for r in ROWS] + [f"{r}_10min" for r in ROWS if not r.startswith("abl_")]
                         + ["rank3_lr2x_2x", "pure_lr2x_2x", "pure_discrete_2x"])
def test_each_row_composes_and_validates(row):
    overrides = _overrides(row)
    assert overrides, row
    cfg = compose(overrides + [f"run_dir=/tmp/{row}"])
    validate(cfg)
    if row.endswith("_10min") and row != "recipe_mohawk_shares_10min":
        assert "experiment=gpu_smollm2_10min" in overrides
    if row.endswith("_2x"):  # twice the ten-minute budget's tokens, stage by stage
        assert "experiment=gpu_smollm2_2x" in overrides
        assert [cfg.stages[s].tokens for s in ("stage1", "stage2", "stage3")] == [16777216, 33554432, 83886080]
    whole_pipelines = ("recipe_s12", "recipe_b_per_head", "recipe_state128", "recipe_mohawk")
    if row.startswith("recipe_") and not row.startswith(whole_pipelines):
        assert cfg.pipeline == ["stage3"] and cfg.student.init_from.endswith(
            "recipe_s12_10min" if row.endswith("_10min") else "recipe_s12")
