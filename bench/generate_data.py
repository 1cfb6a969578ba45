"""Benchmark: `distill generate` (static KV cache + one CUDA graph per step) against the teacher's own `generate()`.

    python bench/generate_data.py --teacher-gguf /root/teacher/smollm2.gguf [--batches 256,512,1024]
                                  [--new-tokens 512] [--hf-batch 1024] [--hf-new-tokens 64] [--out FILE]

Ours: distill.generate.Generator writing real shards (prompts: 32-token prefixes of the bundled text, temperature
1.0, top-p 0.95, bf16), tokens/s of kept generated tokens (cut after EOS) over the whole run, prefill and sampling
included, writing included (it overlaps in a thread), about two shards per batch size after a warm-up shard
(which captures the graph). Peer, in the same run: HF
`generate()` with sampling at the same temperature and top-p, default dynamic cache and `cache_implementation=
"static"`, counting all new tokens (it has no EOS cut: an upper bound for it). Also checks that the decoder's logits
match the teacher's full forward (relative error, bf16).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.cli import compose  # noqa: E402
from distill.generate import Generator  # noqa: E402
from distill.models.teachers.decode import StaticDecoder  # noqa: E402

from bench.common import report  # noqa: E402


def teacher_overrides(args) -> list[str]:
    if args.tiny:
        return ["teacher=tiny-llama"]
    return ["teacher=smollm2", "teacher.source=gguf", f"teacher.path={args.teacher_gguf}", "teacher.dtype=bfloat16"]


def check_logits(gen: Generator) -> float:
    """Worst relative error of the decoder's logits (prefill, then 8 steps) against the full forward."""
    model = gen.teacher.model
    ids = torch.randint(0, model.config.vocab_size, (4, 40), device=gen.device)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
    dec = StaticDecoder(model, 4, 48, cuda_graph=True)
    got = [dec.prefill(ids[:, :32])] + [dec.step(ids[:, t]).clone() for t in range(32, 40)]
    errors = [((g - full[:, 31 + i]).norm() / full[:, 31 + i].norm()).item() for i, g in enumerate(got)]
    return float("nan") if any(e != e for e in errors) else max(errors)  # a NaN must show, not vanish in max


def ours(args, batch: int, folder: Path) -> dict:
    cfg = compose(
        [*teacher_overrides(args), f"out={folder}", f"batch_size={batch}", f"new_tokens={args.new_tokens}",
         f"tokens={batch}", "progress=false", f"device={args.device}"],
        "generate",
    )
    gen = Generator(cfg)
    gen.cfg.tokens = 1
    warm = gen.run()  # warm-up shard: graph capture, allocator
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # Then two shards' worth, timed as `distill generate` times itself (writing overlaps in its thread).
    gen.cfg.tokens = warm["tokens"] + 2 * batch * args.new_tokens
    result = gen.run()
    kept, seconds = result["generated_now"], result["seconds"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if gen.device.type == "cuda" else float("nan")
    err = check_logits(gen) if batch == args.batches[0] else None
    return {"batch": batch, "tokens": kept, "seconds": seconds, "tok_s": kept / seconds, "peak_gb": peak,
            "logit_err": err, "teacher": gen.teacher}


def hf(teacher, args, batch: int, cache: str | None) -> dict:
    model, device = teacher.model, next(teacher.model.parameters()).device
    prompts = torch.randint(0, model.config.vocab_size, (batch, 32), device=device)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=args.hf_new_tokens,
                  min_new_tokens=args.hf_new_tokens, attention_mask=torch.ones_like(prompts),
                  pad_token_id=teacher.tokenizer.eos_token_id)
    if cache:
        kwargs["cache_implementation"] = cache
    with torch.no_grad():
        model.generate(prompts, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompts, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = (out.shape[1] - 32) * batch
    return {"batch": batch, "tokens": new, "seconds": seconds, "tok_s": new / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-gguf", default="/root/teacher/smollm2.gguf")
    parser.add_argument("--batches", default="256,1024,2048")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--hf-batch", type=int, default=1024)
    parser.add_argument("--hf-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="smoke run on the tiny random teacher")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if not args.tiny and not Path(args.teacher_gguf).is_file():
        sys.exit(f"no teacher at {args.teacher_gguf}: bring the GGUF over as ../shared/device/README.md says")

    tmp = Path(tempfile.mkdtemp())
    rows, teacher = [], None
    try:
        for batch in args.batches:
            r = ours(args, batch, tmp / f"b{batch}")
            teacher = r.pop("teacher")
            rows.append(r)
            print(r, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peers = []
    for cache in (None, "static"):
        try:
            p = hf(teacher, args, args.hf_batch, cache)
        except Exception as err:  # a peer that fails is reported, not fatal
            p = {"batch": args.hf_batch, "tokens": 0, "seconds": 0, "tok_s": float("nan"), "error": repr(err)[:200]}
        p["cache"] = cache or "dynamic (default)"
        peers.append(p)
        print(p, flush=True)

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [
        f"Date {datetime.date.today()}. Device: {device}, torch {torch.__version__}. Teacher: "
        f"{'tiny-llama' if args.tiny else 'SmolLM2-135M-Instruct (GGUF Q4_1 -> bf16)'}; prompts 32 tokens; "
        f"temperature 1.0, top-p 0.95.",
        "",
        "| generator | batch | new tokens per sequence | tokens | seconds | tokens/s | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| distill generate | {r['batch']} | {args.new_tokens} (cut at EOS) | {r['tokens']} | "
                     f"{r['seconds']:.2f} | {r['tok_s']:.0f} | {r['peak_gb']:.1f} |")
    for p in peers:
        lines.append(f"| HF generate(), {p['cache']} cache | {p['batch']} | {args.hf_new_tokens} | {p['tokens']} | "
                     f"{p['seconds']:.2f} | {p['tok_s']:.0f} | |" + (f" error: {p['error']}" if "error" in p else ""))
    lines.append("")
    err = rows[0]["logit_err"]
    lines.append(f"Decoder logits vs the teacher's full forward (bf16): worst relative error {err:.2e}.")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
