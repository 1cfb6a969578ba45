"""Does a rule on the token ids find the positions where the teacher needs far context? (CPU; no GPU needed.)

    python bench/recall_rule.py --teacher-gguf PATH.gguf --data-dir ../shared/data [--seq-len 1024] [--per-file 2]

The teacher's recall positions (distill/recall.py, `distill rank`'s definition: the true next token's
log-probability drops by more than --margin nats when the teacher's attention sees only the last --window tokens
and the first --sink) on sequences of the offline NLTK texts, against two rules on the ids alone: "far & not near"
(the next token appeared more than w tokens back and not since) and "first recurrence" (the same, and it appeared
once before): the share each rule picks, its precision (how many of its picks are recall positions) and its recall
(how many recall positions it finds). A rule is worth its (free) cost only where its precision is well above the
share of recall positions among all positions (what a random pick scores).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.config import TeacherConfig  # noqa: E402
from distill.models.teachers import load_teacher  # noqa: E402
from distill.recall import recall_positions  # noqa: E402

from bench.common import report  # noqa: E402


def id_rule(ids: torch.Tensor, w: int, first: bool) -> torch.Tensor:
    """(b, L - 1) bool: the next token appeared more than w tokens back and not since (and, if `first`, once)."""
    target, context = ids[:, 1:], ids[:, :-1]
    same = target[:, :, None] == context[:, None, :]
    t = torch.arange(ids.shape[1] - 1)
    back = t[:, None] - t[None, :]
    far = (same & (back >= w)).any(-1)
    if first:
        return far & ((same & (back >= 0)).sum(-1) == 1)
    return far & ~(same & (back >= 0) & (back < w)).any(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-gguf", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--per-file", type=int, default=2, help="sequences from each train_text file")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--margin", type=float, default=1.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    teacher = load_teacher(TeacherConfig(name="smollm2", source="gguf", path=args.teacher_gguf, dtype="float32"))
    files = sorted(glob.glob(f"{args.data_dir}/train_text/*.jsonl.gz"))
    if not files:
        sys.exit(f"no train_text/*.jsonl.gz under {args.data_dir}")
    batches = []
    for f in files:  # a stretch from the middle of the first documents of each file
        text = " ".join(json.loads(line)["text"] for _, line in zip(range(300), gzip.open(f, "rt")))
        ids = teacher.tokenizer(text)["input_ids"][5000 : 5000 + args.per_file * args.seq_len]
        batches.append(torch.tensor(ids).view(args.per_file, args.seq_len))
    ids = torch.cat(batches)
    t0 = time.perf_counter()
    with torch.no_grad():
        positions = recall_positions(teacher, ids, teacher.final_hidden(ids), args.window, args.sink, args.margin)
    seconds = time.perf_counter() - t0
    truth = positions.flatten()
    lines = [
        f"Teacher SmolLM2-135M-Instruct (float32, CPU), {ids.shape[0]} sequences of {args.seq_len} tokens "
        f"({len(files)} NLTK files); recall positions: window {args.window}, sink {args.sink}, margin {args.margin}: "
        f"**{truth.float().mean():.3f}** of {truth.numel()} positions (a random pick's precision); "
        f"{seconds:.0f} s for the two teacher passes.",
        "",
        "| rule | w | share picked | precision | recall |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, first in (("far & not near", False), ("first recurrence", True)):
        for w in (8, 16, 32, 64, 128, 256):
            picked = id_rule(ids, w, first).flatten()
            hits = (picked & truth).sum().item()
            lines.append(f"| {name} | {w} | {picked.float().mean():.3f} | {hits / max(1, picked.sum().item()):.3f} | "
                         f"{hits / max(1, truth.sum().item()):.3f} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
