"""Where a training step's GPU time goes: one stage's step under torch.profiler, kernels grouped and ranked.

    python bench/profile_step.py --random-smollm2 [--stage 3] [--batch 16] [--seq-len 2048] [--out FILE]
    python bench/profile_step.py --device cpu --tiny --stage 1      (a smoke run)

The step is the trainer's (distill.stages.stage_step + clipping + fused AdamW), on SmolLM2-135M's shapes with random
weights and a pure discrete student, bf16 autocast. After 3 warm-up steps, `--steps` steps are profiled; the table
gives each kernel family's device time per step (kernel names folded: template arguments and launch shapes
dropped), its share of the step's kernel time and its launches per step (a second table: the same time by the
PyTorch op that launched it; `--shapes aten::copy_,aten::mul` adds, for those ops, their time by input shapes), and the head line compares the summed
kernel time with the wall time of a step (kernel time near the wall time: GPU-bound; far below: the host sets the
pace).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.config import StageConfig, StudentConfig, TeacherConfig  # noqa: E402
from distill.models.rope import use_fused_rope  # noqa: E402
from distill.models.teachers import load_teacher  # noqa: E402
from distill.models.transfer import build_student  # noqa: E402
from distill.stages import stage_step, trainable_parameters  # noqa: E402

from bench.common import SMOLLM2, TINY, report  # noqa: E402

STAGES = {
    1: (StageConfig(loss="matrix", tokens=1), "mixers"),
    2: (StageConfig(loss="hidden", tokens=1), "ssd_blocks"),
    3: (StageConfig(loss="logits", tokens=1, chunk_tokens=4096), "all_but_embeddings"),
}


def family(name: str) -> str:
    """A kernel's name without template arguments, parameter lists and numbers, so launches of one kernel at
    several shapes count together."""
    name = re.sub(r"<.*>", "", name)
    name = re.sub(r"\(.*\)", "", name)
    name = re.sub(r"\d+", "N", name)
    return name.strip()[:90]


def device_time_us(event) -> float:
    for key in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, key):
            return float(getattr(event, key))
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--random-smollm2", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="", help="comma list of ops (aten::copy_) to break down by input shapes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    architecture = TINY if args.tiny else SMOLLM2
    if args.tiny:
        args.batch, args.seq_len = 2, 128
    teacher = load_teacher(TeacherConfig(name="profile", source="random", architecture=architecture,
                                         dtype="bfloat16")).to(device)
    use_fused_rope(teacher.config.model_type)  # as the trainer does
    student = build_student(teacher, StudentConfig(form="discrete"), attention_layers=[]).to(device)
    cfg, trainable = STAGES[args.stage]
    step = stage_step(cfg)
    params = trainable_parameters(student, trainable)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, architecture["vocab_size"], (args.batch, args.seq_len), device=device)
    student.train()

    def one():
        opt.zero_grad(set_to_none=True)
        result = step(student, teacher, ids, "bf16").to_floats()
        torch.nn.utils.clip_grad_norm_(plist, 1.0)
        opt.step()
        return result

    for _ in range(3):
        one()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    sync()
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=bool(args.shapes)) as prof:
        for _ in range(args.steps):
            one()
        sync()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.key_averages():
        us = device_time_us(event) if device.type == "cuda" else float(event.self_cpu_time_total)
        if us <= 0 or (device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        totals[family(event.key)] += us / args.steps
        counts[family(event.key)] += event.count // args.steps
    kernel_ms = sum(totals.values()) / 1e3
    what = "kernel" if device.type == "cuda" else "CPU op (self)"
    lines = [
        f"Stage {args.stage} step, batch {args.batch} x {args.seq_len}, "
        f"{'tiny' if args.tiny else 'SmolLM2-135M shapes'}, bf16 autocast, on {device}: wall {wall_ms:.1f} ms a step "
        f"unprofiled; {what} time {kernel_ms:.1f} ms a step.",
        "",
        f"| {what} | ms per step | share | launches per step |",
        "| --- | --- | --- | --- |",
    ]
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        lines.append(f"| `{name}` | {us / 1e3:.2f} | {us / 1e3 / kernel_ms:.1%} | {counts[name]} |")
    if device.type == "cuda":
        # The same device time by the PyTorch op that launched it: elementwise kernels are named by their
        # template alone, the op says which (mul, copy_, softplus...).
        ops, op_counts = defaultdict(float), defaultdict(int)
        for event in prof.key_averages():
            if event.device_type == torch.autograd.DeviceType.CPU and event.key.startswith("aten::"):
                us = device_time_us(event)
                if us > 0:
                    ops[event.key] += us / args.steps
                    op_counts[event.key] += event.count // args.steps
        lines += ["", "| PyTorch op (self device time) | ms per step | share | calls per step |", "| --- | --- | --- | --- |"]
        for name, us in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
            lines.append(f"| `{name}` | {us / 1e3:.2f} | {us / 1e3 / kernel_ms:.1%} | {op_counts[name]} |")
    wanted = [name for name in args.shapes.split(",") if name]
    if wanted:
        # Which calls of these ops cost the time: the same op at one input shape (and dtype) counted together.
        lines += ["", "| op | input shapes | ms per step | calls per step |", "| --- | --- | --- | --- |"]
        rows = []
        for event in prof.key_averages(group_by_input_shape=True):
            if event.key in wanted and event.device_type == torch.autograd.DeviceType.CPU:
                us = device_time_us(event) if device.type == "cuda" else float(event.self_cpu_time_total)
                if us > 0:
                    rows.append((us / args.steps, event.key, event.input_shapes, event.count // args.steps))
        for us, key, shapes, count in sorted(rows, key=lambda r: -r[0])[: args.top]:
            lines.append(f"| `{key}` | {shapes} | {us / 1e3:.2f} | {count} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
