"""`distill inspect` on a tiny run: the pictures exist, the ranking is right and its numbers are the stage-1 math."""

import re

import torch

from distill.cli import main
from distill.run_folder import load_run


def test_inspect_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "experiment=tiny", f"run_dir={run_dir}", "student.attention_layers=[]",
                 "pipeline=[stage1]", "stages.stage1.tokens=512"]) == 0
    assert main(["inspect", f"checkpoint={run_dir}", "heads=[0]", "batches=1", "keep=2"]) == 0
    out = run_dir / "inspect"
    for name in ("layer_losses.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert len(list(out.glob("matrices_layer*.png"))) == 3
    summary = (out / "summary.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.e+-]+) \| ([\d.e+-]+) \|$", summary, flags=re.MULTILINE)
    assert sorted(int(r[1]) for r in rows) == [0, 1, 2, 3]  # every SSD layer, once
    # The stage-1 number of one layer equals an independent computation on the same held-out batch.
    run = load_run(run_dir)
    from distill.inspect import held_out_batches

    ids = held_out_batches(run, 1)[0]
    layer = int(rows[0][1])
    record = run.teacher.capture(ids, [layer]).layers[layer]
    block = run.student.model.layers[layer]
    with torch.no_grad():
        M = block.self_attn.mixing_matrix(block.input_layernorm(record.block_input))
    distance = (record.attention_matrix().double() - M.double()).flatten(2).norm(dim=-1).mean().item()
    expected = distance / ids.shape[1] ** 0.5  # stage 1 is normalised by sqrt(L)
    assert abs(float(rows[0][2]) - expected) <= 1e-3 * expected
    # The suggestion keeps the 2 worst-ranked layers as attention.
    worst = sorted(int(r[1]) for r in rows[:2])
    assert f"student.attention_layers=[{','.join(map(str, worst))}]" in summary
    assert "pictures and summary in" in capsys.readouterr().out
