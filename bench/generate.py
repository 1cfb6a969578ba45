"""Benchmark: the decode payoff. Tokens/s and memory of an exported pure-SSD student against its teacher.

    python bench/generate.py --teacher-gguf /root/teacher/smollm2.gguf [--prompts 2048,8192,32768] [--batches 1,64]
                             [--new-tokens 64] [--attention "20;8,20,23"] [--out FILE]
    python bench/generate.py --random-smollm2 ...   (SmolLM2-135M's shapes, random weights: no GGUF needed)

Both through `generate()` (greedy, bf16, `min_new_tokens` = `max_new_tokens` so EOS cannot end a run early):
  teacher   SmolLM2-135M-Instruct, with the default dynamic cache and with `cache_implementation="static"`; the
            faster is its best. Its limit is 8192 positions: at the 32K prompt it runs past it (RoPE extrapolates;
            the output is meaningless there, the speed and memory are what is measured).
  student   the teacher's weights transferred into a pure discrete-Mamba-2 student (all 30 layers SSD), exported
            with `distill export` and loaded back with `trust_remote_code`, decoding on its recurrent cache and the
            Triton decode step, eagerly and with `enable_cuda_graph_decode()` (weights untrained: speed does not
            depend on them). `--attention` adds hybrids (semicolon-separated lists of the layers each keeps as
            attention; their KV caches grow with the prompt), eagerly and with CUDA graphs (static KV buffers):
            the attention-budget curve.
Time: wall clock of `generate()` with N new tokens minus that with 1 new token (the prefill), so tokens/s is the
decode rate, after a warm-up call at the same prompt length (2 new tokens); peak memory is
torch.cuda.max_memory_allocated over the whole call. Runs that do not fit are reported as
out of memory.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.config import StudentConfig, TeacherConfig  # noqa: E402
from distill.export import export_student  # noqa: E402
from distill.models.teachers import load_teacher  # noqa: E402
from distill.models.transfer import build_student  # noqa: E402

from bench.common import SMOLLM2, report  # noqa: E402


def timed_generate(model, prompts: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, float]:
    """(seconds, peak GB) of one generate() call producing exactly `new_tokens` tokens."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    torch.cuda.synchronize()
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def measure(model, batch: int, prompt: int, new_tokens: int, vocab: int, **kwargs) -> dict:
    prompts = torch.randint(0, vocab, (batch, prompt), device="cuda")
    try:
        # Warm-up at the measured length: kernels, autotuning, the allocator, and the CUDA-graph decoder a hybrid
        # captures for its KV buffers' room (a decoder captured for a shorter prompt has too little, and capturing
        # a new one inside the timed call would be counted as decoding).
        timed_generate(model, prompts, 2, **kwargs)
        prefill, _ = timed_generate(model, prompts, 1, **kwargs)
        total, peak = timed_generate(model, prompts, new_tokens, **kwargs)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}
    decode = max(total - prefill, 1e-9)
    torch.cuda.empty_cache()
    return {
        "prefill_s": prefill,
        "tok_s": batch * (new_tokens - 1) / decode,
        "ms_per_token": 1000 * decode / (new_tokens - 1),
        "peak_gb": peak,
    }


def fmt(r: dict | None) -> tuple[str, str, str]:
    if r is None:
        return "", "", ""
    if r.get("oom"):
        return "out of memory", "", ""
    return f"{r['tok_s']:.0f}", f"{r['ms_per_token']:.2f}", f"{r['peak_gb']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-gguf", default="/root/teacher/smollm2.gguf")
    parser.add_argument("--prompts", default="2048,8192,32768")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--student-new-tokens", type=int, default=256)
    parser.add_argument("--skip-static", action="store_true", help="teacher: default cache only")
    parser.add_argument("--attention", default="", help='hybrids too, e.g. "20;20,23;8,20,23" (layers kept)')
    parser.add_argument("--random-smollm2", action="store_true",
                        help="SmolLM2-135M's shapes with random weights (no GGUF; speed does not depend on weights)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.random_smollm2 and not Path(args.teacher_gguf).is_file():
        sys.exit(f"no teacher at {args.teacher_gguf}: bring the GGUF over as ../shared/device/README.md says, or "
                 "pass --random-smollm2")
    lengths = [int(x) for x in args.prompts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]

    hybrids = [[int(i) for i in h.split(",")] for h in args.attention.split(";") if h.strip()]
    if args.random_smollm2:
        tcfg = TeacherConfig(name="smollm2-shaped", source="random", architecture=SMOLLM2, dtype="bfloat16")
    else:
        tcfg = TeacherConfig(name="smollm2", source="gguf", path=args.teacher_gguf, dtype="bfloat16")
    teacher = load_teacher(tcfg)

    def exported_student(attention_layers: list[int]):
        """The student as a user gets it: exported, loaded back with its remote code, bf16 on the GPU."""
        student = build_student(teacher, StudentConfig(form="discrete"), attention_layers=attention_layers)
        with tempfile.TemporaryDirectory() as tmp:
            export_student(student, teacher.tokenizer, Path(tmp) / "student")
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "student", trust_remote_code=True, dtype=torch.bfloat16
            ).cuda().eval()

    exported = exported_student([])
    hybrid_models = [(h, exported_student(h)) for h in hybrids]
    hf_teacher = teacher.model.to("cuda", torch.bfloat16).eval()
    hf_teacher.set_attn_implementation("sdpa")  # the teacher's stock fast path, not distill's capture hook
    vocab = hf_teacher.config.vocab_size

    rows = []  # (prompt, batch, who, result)
    for prompt in lengths:
        for batch in batches:
            first = len(rows)
            rows.append((prompt, batch, "teacher, dynamic cache", measure(hf_teacher, batch, prompt, args.new_tokens,
                                                                         vocab)))
            if not args.skip_static:
                rows.append((prompt, batch, "teacher, static cache",
                             measure(hf_teacher, batch, prompt, args.new_tokens, vocab, cache_implementation="static")))
            exported.enable_cuda_graph_decode(False)
            rows.append((prompt, batch, "student, eager steps",
                         measure(exported, batch, prompt, args.student_new_tokens, vocab)))
            exported.enable_cuda_graph_decode(True)
            rows.append((prompt, batch, "student, CUDA-graph steps",
                         measure(exported, batch, prompt, args.student_new_tokens, vocab)))
            for layers, hybrid in hybrid_models:
                hybrid.enable_cuda_graph_decode(False)
                rows.append((prompt, batch, f"hybrid, attention at {layers}, eager steps",
                             measure(hybrid, batch, prompt, args.student_new_tokens, vocab)))
                hybrid.enable_cuda_graph_decode(True)
                rows.append((prompt, batch, f"hybrid, attention at {layers}, CUDA-graph steps",
                             measure(hybrid, batch, prompt, args.student_new_tokens, vocab)))
            for row in rows[first:]:
                print(row, flush=True)

    lines = [
        f"Date {datetime.date.today()}. Device: {torch.cuda.get_device_name()}, torch {torch.__version__}. bf16, "
        f"greedy; teacher {args.new_tokens} and student {args.student_new_tokens} new tokens per sequence; decode "
        "tokens/s (prefill excluded), ms per decode step, peak GB over the call; ratio = pure student (best path) "
        "/ teacher (best cache).",
        "",
        "| prompt | batch | model, path | decode tokens/s | ms per step | peak GB | prefill s | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ok = lambda r: r and not r.get("oom")
    for prompt in lengths:
        for batch in batches:
            group = [(who, r) for p, b, who, r in rows if (p, b) == (prompt, batch)]
            teachers = [r["tok_s"] for who, r in group if who.startswith("teacher") and ok(r)]
            students = [r["tok_s"] for who, r in group if who.startswith("student") and ok(r)]  # the pure one
            ratio = f"{max(students) / max(teachers):.1f}x" if teachers and students else ""
            for who, r in group:
                tok_s, ms, gb = fmt(r)
                prefill = f"{r['prefill_s']:.2f}" if ok(r) else ""
                lines.append(f"| {prompt} | {batch} | {who} | {tok_s} | {ms} | {gb} | {prefill} | {ratio} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
