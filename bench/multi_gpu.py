"""Benchmark: stage-3 tokens/s, loss curve and per-GPU memory under DeepSpeed ZeRO on N GPUs (one process a GPU).

Run under torchrun, once per setting, then print the table from the JSON files:

    torchrun --nproc_per_node=1 bench/multi_gpu.py --teacher-gguf /root/teacher/smollm2.gguf --zero 2 --out one.json
    torchrun --nproc_per_node=2 bench/multi_gpu.py --teacher-gguf /root/teacher/smollm2.gguf --zero 2 --out two.json
    torchrun --nproc_per_node=2 bench/multi_gpu.py --llama-1b --zero 2 --out z2.json
    torchrun --nproc_per_node=2 bench/multi_gpu.py --llama-1b --zero 3 --teacher-zero3 --out z3.json
    python bench/multi_gpu.py --table one.json two.json z2.json z3.json
    torchrun --nproc_per_node=2 bench/multi_gpu.py --tiny --device cpu --steps 3   (smoke run over gloo)

Each run is what `distill train trainer=zeroN` does in stage 3 (distill.distributed: engine config, optimizer,
per-rank rows of each global batch, one backward, engine.step): a pure discrete-Mamba-2 student, forward KL from
chunked hidden states, bf16 autocast, trainable all_but_embeddings, the same seeded global batches whatever N, so
the per-step losses of a 1-GPU and an N-GPU run are comparable. `--llama-1b` builds the teacher from
Llama-3.2-1B's architecture with random weights (no hub on the GPU machine; memory does not depend on the
weights). Reported: global tokens/s over the timed steps, every step's loss, and the largest peak
`torch.cuda.max_memory_allocated` over the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill import distributed  # noqa: E402
from distill.config import StageConfig, StudentConfig, TeacherConfig, TrainerConfig  # noqa: E402
from distill.models.teachers import load_teacher  # noqa: E402
from distill.models.transfer import build_student  # noqa: E402
from distill.stages import stage_step, trainable_parameters  # noqa: E402

from distill import kernels  # noqa: E402

from bench.common import LLAMA_1B, SMOLLM2, TINY  # noqa: E402



def teacher_config(args) -> TeacherConfig:
    if args.tiny:
        return TeacherConfig(name="tiny", source="random", architecture=TINY, dtype="float32")
    if args.llama_1b:
        return TeacherConfig(name="llama-3.2-1b-shaped", source="random", architecture=LLAMA_1B, dtype="bfloat16")
    if args.random_smollm2:
        return TeacherConfig(name="smollm2-shaped", source="random", architecture=SMOLLM2, dtype="bfloat16")
    if not Path(args.teacher_gguf).is_file():
        sys.exit(f"no teacher at {args.teacher_gguf}: bring the GGUF over as ../shared/device/README.md says")
    return TeacherConfig(name="smollm2", source="gguf", path=args.teacher_gguf, dtype="bfloat16")


def run(args) -> dict:
    device = distributed.local_device(args.device)
    rank, world = distributed.init(device)
    kernels.set_backend(args.kernels)
    user = {"zero_optimization": {"stage": args.zero, "contiguous_gradients": True, "overlap_comm": False}}
    if args.zero == 3:
        user["zero_optimization"]["stage3_param_persistence_threshold"] = 100000
    stage = StageConfig(loss="logits", tokens=1, batch_size=args.batch, seq_len=args.seq_len, lr=1e-4,
                        trainable="all_but_embeddings", chunk_tokens=args.chunk_tokens)
    tcfg = teacher_config(args)
    teacher = load_teacher(tcfg)
    student = build_student(teacher, StudentConfig(form="discrete"), attention_layers=[])
    if args.teacher_zero3:  # after the student has copied the teacher's whole weights
        teacher = distributed.partition_teacher(teacher, user, device)
    teacher.to(device)
    student.to(device)
    params = trainable_parameters(student, stage.trainable)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = distributed.make_optimizer(list(params.values()), stage, TrainerConfig(deepspeed=user), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = distributed.initialize(student, optimizer, scheduler, distributed.engine_config(user, stage, world),
                                    stage)
    precision = "bf16"
    step_fn = stage_step(stage)
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)  # the same global batches on every rank and for any N
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=g) for _ in range(args.steps + 3)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, t0 = [], None
    for i, batch in enumerate(batches):
        if i == 3:  # after 3 warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            distributed.barrier()
            t0 = time.perf_counter()
        result = distributed.forward_backward(engine, step_fn, teacher, batch.to(device), precision, rank, world)
        engine.step()
        losses.append(result.loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                        device=device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "rank": rank, "processes": world, "zero": args.zero, "teacher_zero3": args.teacher_zero3,
        "kernels": args.kernels,
        "teacher": tcfg.name, "device": name, "batch": args.batch, "seq_len": args.seq_len,
        "tokens_per_s": args.batch * args.seq_len / seconds, "ms_per_step": seconds * 1e3,
        "peak_gb_max_over_ranks": peak.item(), "losses": losses,
    }


def table(paths: list[str]) -> str:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    base = next((r for r in rows if r["processes"] == 1), None)
    lines = [
        "| teacher | processes | ZeRO | teacher partitioned | tokens/s | ms per step | speed-up | peak GB per GPU "
        "| max relative loss difference to 1 process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        same = base is not None and base["teacher"] == r["teacher"] and base["batch"] == r["batch"]
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if same else ""
        diff = (f"{max(abs(a - b) / abs(b) for a, b in zip(r['losses'], base['losses'])):.1e}"
                if same and r is not base else "")
        lines.append(f"| {r['teacher']} | {r['processes']} | {r['zero']} | {r['teacher_zero3']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {speedup} | "
                     f"{r['peak_gb_max_over_ranks']:.1f} | {diff} |")
    device = rows[0]["device"]
    head = (f"Device: {device}; global batch {rows[0]['batch']} x {rows[0]['seq_len']}; stage 3, bf16 autocast, "
            "pure discrete student, torch AdamW through DeepSpeed.")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-gguf", default="/root/teacher/smollm2.gguf")
    parser.add_argument("--llama-1b", action="store_true", help="Llama-3.2-1B's architecture, random weights")
    parser.add_argument("--tiny", action="store_true", help="a tiny random teacher (smoke runs, CPU)")
    parser.add_argument("--random-smollm2", action="store_true", help="SmolLM2-135M's shapes, random weights")
    parser.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                        help="torch: every kernel through its PyTorch reference (to tell kernel effects apart)")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--teacher-zero3", action="store_true", help="partition the teacher with ZeRO-3 too")
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the processes)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", nargs="+", help="print the table of these JSON results and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.tiny:
        args.batch, args.seq_len, args.chunk_tokens = min(args.batch, 4), min(args.seq_len, 64), 64
    result = run(args)
    if result["rank"] == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()
    os._exit(0)  # DeepSpeed's atexit hooks can hang a finished gloo group


if __name__ == "__main__":
    main()
