"""Benchmark: training tokens/s and peak memory of each stage, as `distill train` runs them, on one GPU.

    python bench/train_throughput.py --teacher-gguf /root/teacher/smollm2.gguf [--batch 16] [--seq-len 2048]
                                     [--steps 10] [--out FILE]
    python bench/train_throughput.py --random-smollm2     (SmolLM2-135M's shapes, random weights: no GGUF needed)
    python bench/train_throughput.py --device cpu --tiny  (a smoke run on the tiny random teacher)

Teacher SmolLM2-135M-Instruct (bf16 weights), a pure discrete-Mamba-2 student (all 30 layers SSD), bf16 autocast,
kernels auto (Triton on CUDA). Each stage is its trainer step (distill.stages.stage_step: one teacher forward, the
stage's loss and backward, gradient clipping, AdamW over the stage's trainable set), run two ways as the trainer
runs it: eagerly (torch's AdamW) and captured once as a CUDA graph and replayed (distill.graph_step, fused AdamW;
`trainer.cuda_graphs=true`; on in the GPU presets since 2026-12-03, when it measured faster). 3 warm-up steps, then `--steps` timed steps between CUDA
synchronisations; each step reads its losses back to the host, as training does. Stage 3 runs the fused, chunked
divergence (what training runs) and, for comparison, full-vocabulary logits (the reference path, eager). The
teacher's forward alone (no capture, logits) is the scale. `--ablate conv,rms_norm,swiglu,align,divergence,out_norm,
norm_dtype,split_pad,rope` adds stage-3 rows with each named piece, then all of them, undone, on each path timed (the
PyTorch reference for a kernel; for `align`, in_proj's product at its own odd width; for `divergence`, the chunk's
loss and gradient through autograd; `out_norm`, the Mamba-2 form's output norm alone, for a mamba2 first form;
`norm_dtype`, the layer norms writing float32 for autocast to cast; `split_pad`, in_proj's product sliced before its
split; `rope`, transformers' eager rotary embedding instead of liger-kernel's, where installed): what each of the
step's kernels and passes buys, measured in one run. `--stage1-fp32` adds a stage-1 row with B
and C upcast to float32 before the fused loss (the step before 2026-12-02). `--chunk-tokens 4096,1024` times stage 3
at each divergence chunk (the first is used for the other rows); `--forms discrete,mamba2` adds the eager stage rows of
each further student form (the first form gets every row); `--attention "8,20,23;..."` adds stage-3 rows of hybrids
that keep those layers as attention (the quality rows' hybrids ran stage 3 slower than the pure student); `--recall`
a stage-3 row with `recall_weight` (its second, windowed teacher forward); `--d-state 128` stage-1 and stage-3 rows
of a student with that state size; `--divergences reverse_kl,jsd` stage-3 rows with those divergences (the screen's
JSD row trained at 0.59x forward KL's rate on the PyTorch reference); `--trainables mixers` stage-3 rows training
only that set (recipe_mlp_frozen: no gradients for the MLPs' weights, a third of their backward products).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill import kernels  # noqa: E402
from distill.cli import compose  # noqa: E402
from distill.config import TRAINABLE, StageConfig, StudentConfig, TeacherConfig  # noqa: E402
from distill.kernels import reference  # noqa: E402
from distill.kernels.reference import DIVERGENCES  # noqa: E402
from distill.models import rope  # noqa: E402
from distill.models.student.modeling_distill import AlignedLinear, KernelRMSNorm, RMSNorm, SSDMixer  # noqa: E402
from distill.models.teachers import load_teacher  # noqa: E402
from distill.models.transfer import build_student  # noqa: E402
from distill.stages import stage_step, trainable_parameters  # noqa: E402
from distill.stages.common import StepResult, autocast  # noqa: E402
from distill.stages.divergence import divergence_reference  # noqa: E402
from distill.graph_step import capture_step, make_adamw  # noqa: E402

from bench.common import SMOLLM2, report  # noqa: E402



def full_logits_step(student, teacher, ids, precision):
    """Stage 3 through full-vocabulary logits: the path the fused divergence replaces."""
    with autocast(ids.device, precision):
        t = teacher.logits(ids)
        s = student(input_ids=ids, use_cache=False).logits
    loss, _ = divergence_reference(s[:, :-1], t[:, :-1])
    loss.backward()
    return StepResult(loss=loss.detach())


FORM_NAMES = {"discrete": "discrete-Mamba-2", "mamba2": "Mamba-2-form"}
ABLATABLE = ("conv", "rms_norm", "swiglu", "align", "divergence", "out_norm", "norm_dtype", "split_pad", "rope")


def _project_sliced(mixer: SSDMixer, hidden_states: torch.Tensor):
    """in_proj's product sliced to its width, then split: SSDMixer._project as it ran before 2026-12-04."""
    widths = [mixer.x_width, mixer.x_width + mixer.b_width + mixer.c_width, mixer.spec.n_heads]
    return mixer.in_proj(hidden_states).split(widths, dim=-1)


@contextlib.contextmanager
def without(pieces: tuple[str, ...]):
    """The named kernels through their PyTorch references (F.conv1d, the family's eager norm and gate, the chunk
    divergence through autograd) and, for "align", in_proj's product unpadded; "norm_dtype", the layer norms'
    output in float32 for autocast to cast at each product; "split_pad", in_proj's padded product sliced before its
    split; "rope", transformers' eager rotary embedding instead of liger's kernel: the step as it ran before each
    piece existed."""
    saved = (kernels._triton_function, AlignedLinear.align, RMSNorm.forward, KernelRMSNorm.forward, SSDMixer._project)
    swapped = {m: m.apply_rotary_pos_emb for m in map(sys.modules.get, rope.FAMILY_MODULES.values())
               if m is not None and hasattr(m.apply_rotary_pos_emb, "original")}
    original = saved[0]
    kernels._triton_function = lambda name: None if name in pieces else original(name)
    if "align" in pieces:
        AlignedLinear.align = 1
    if "out_norm" in pieces:  # the Mamba-2 form's output norm alone on the reference (the family's norms kept)
        RMSNorm.forward = lambda self, y: reference.rms_norm(y, self.weight, self.eps).to(y.dtype)
    if "norm_dtype" in pieces:
        KernelRMSNorm.forward = lambda self, h: kernels.rms_norm(h, self.weight, self.variance_epsilon)
    if "split_pad" in pieces:
        SSDMixer._project = _project_sliced
    if "rope" in pieces:
        for module, fn in swapped.items():
            module.apply_rotary_pos_emb = fn.original
    try:
        yield
    finally:
        (kernels._triton_function, AlignedLinear.align, RMSNorm.forward, KernelRMSNorm.forward,
         SSDMixer._project) = saved
        for module, fn in swapped.items():
            module.apply_rotary_pos_emb = fn


@contextlib.contextmanager
def stage1_bc_float32():
    """Stage 1 with B and C upcast to float32 before the fused loss, as it ran before 2026-12-02: the kernel's
    C.B products then go through 3xTF32 instead of bf16 tensor-core products."""
    original = kernels.stage1_loss
    kernels.stage1_loss = lambda q, k, softmax_scale, log_a, B, C, scale=None: original(
        q, k, softmax_scale, log_a, B.float(), C.float(), scale)
    try:
        yield
    finally:
        kernels.stage1_loss = original


def within(context, measure):
    """The measure run inside `context()` (a fresh context manager each time)."""
    def run():
        with context():
            return measure()
    return run


def median_row(rows: list[dict]) -> dict:
    """One row from a row's rounds: the round of median step time."""
    timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    return timed[(len(timed) - 1) // 2] if timed else rows[-1]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_stage(name, step, trainable, student, teacher, ids, *, precision, steps, device, graph=False) -> dict:
    params = trainable_parameters(student, trainable)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    plist = list(params.values())
    if graph or device.type != "cuda":
        opt = make_adamw(plist, 1e-5, 0.0, device, graphs=graph)
    else:  # eager on CUDA with fused AdamW too, so the two rows differ by the capture alone
        opt = torch.optim.AdamW(plist, lr=1e-5, betas=(0.9, 0.95), fused=True)
    student.train()
    label = f"{name}, {'CUDA graph' if graph else 'eager'}"
    captured = None

    def one():
        if captured is not None:
            result, _ = captured(ids)
            return result.to_floats()
        opt.zero_grad(set_to_none=True)
        result = step(student, teacher, ids, precision).to_floats()
        torch.nn.utils.clip_grad_norm_(plist, 1.0)
        opt.step()
        return result

    try:
        if graph:
            captured, why = capture_step(step, student, teacher, plist, opt, 1.0, precision, ids)
            if captured is None:
                return {"stage": label, "failed": why}
        for _ in range(3):
            one()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = one().loss
        sync(device)
    except torch.OutOfMemoryError:
        return {"stage": label, "oom": True}
    finally:
        if captured is not None:
            captured.close()
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"stage": label, "tok_s": ids.numel() / seconds, "ms": seconds * 1e3, "peak_gb": peak, "loss": loss}


def names_among(allowed: tuple[str, ...]):
    """An argparse type: a comma list of names from `allowed` (argparse refuses any other, before a model loads)."""
    def parse(value: str) -> list[str]:
        names = [name for name in value.split(",") if name]
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"{','.join(unknown)}: choose among {','.join(allowed)}")
        return names
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-gguf", default="/root/teacher/smollm2.gguf")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunk-tokens", default="4096",
                        help="stage-3 divergence chunk(s), comma list: a stage-3 row for each; the first for the rest")
    parser.add_argument("--forms", default="discrete",
                        help="student form(s), comma list of discrete, mamba2: the first gets every row, the others "
                             "the eager stage rows")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--random-smollm2", action="store_true", help="SmolLM2-135M's shapes with random weights")
    parser.add_argument("--no-eager", action="store_true", help="time the CUDA-graph path only")
    parser.add_argument("--no-graph", action="store_true", help="time the eager path only")
    parser.add_argument("--ablate", default="", type=names_among(ABLATABLE),
                        help=f"comma list from {','.join(ABLATABLE)}: stage-3 rows with each piece, then all, undone")
    parser.add_argument("--stage1-fp32", action="store_true",
                        help="add a stage-1 row with B and C upcast to float32 before the loss (as before 2026-12-02)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every row this many times, in turn, and report each row's median")
    parser.add_argument("--attention", default="",
                        help='stage-3 rows of hybrids too (eager and graph), e.g. "8,20,23;1,8,17,20,23,24"')
    parser.add_argument("--recall", action="store_true",
                        help="a stage-3 row with recall weighting (a second, windowed teacher forward a step)")
    parser.add_argument("--d-state", type=int, default=0,
                        help="stage-1 and stage-3 rows of a student with this SSD state size too (student.d_state)")
    parser.add_argument("--divergences", default="", type=names_among(DIVERGENCES),
                        help='stage-3 rows with other divergences too, e.g. "reverse_kl,jsd" (forward_kl is the base row)')
    parser.add_argument("--trainables", default="", type=names_among(TRAINABLE),
                        help='stage-3 rows training only these sets too, e.g. "mixers,ssd_blocks"')
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        tcfg = compose(["experiment=tiny"]).teacher
        args.batch, args.seq_len, args.steps = 2, 128, 2
    elif args.random_smollm2:
        tcfg = TeacherConfig(name="smollm2-shaped", source="random", architecture=SMOLLM2, dtype="bfloat16")
    else:
        if not Path(args.teacher_gguf).is_file():
            sys.exit(f"no teacher at {args.teacher_gguf}: bring the GGUF over as ../shared/device/README.md says")
        tcfg = TeacherConfig(name="smollm2", source="gguf", path=args.teacher_gguf, dtype="bfloat16")
    chunk_list = [c for c in args.chunk_tokens.split(",") if c]
    forms = [f for f in args.forms.split(",") if f]
    if not chunk_list or not all(c.isdigit() and int(c) > 0 for c in chunk_list) \
            or not forms or set(forms) - {"discrete", "mamba2"}:
        sys.exit("--chunk-tokens takes positive integers and --forms names among discrete, mamba2")
    chunks = [int(c) for c in chunk_list]
    teacher = load_teacher(tcfg).to(device)
    rope.use_fused_rope(teacher.config.model_type)  # as the trainer does
    student = build_student(teacher, StudentConfig(form=forms[0]), attention_layers=[]).to(device)
    precision = "bf16"
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq_len), device=device)

    def teacher_forward() -> dict:
        """The teacher's forward alone (logits, no capture), for scale."""
        with torch.no_grad(), autocast(device, precision):
            for _ in range(3):
                teacher.logits(ids)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                teacher.logits(ids)
            sync(device)
        seconds = (time.perf_counter() - t0) / args.steps
        return {"stage": "teacher forward alone", "tok_s": ids.numel() / seconds, "ms": seconds * 1e3,
                "peak_gb": float("nan"), "loss": float("nan")}

    stages = [
        ("stage 1 (matrix, mixers)", StageConfig(loss="matrix", tokens=1), "mixers"),
        ("stage 2 (hidden, ssd_blocks)", StageConfig(loss="hidden", tokens=1), "ssd_blocks"),
        ("stage 3 (logits fused, all_but_embeddings)",
         StageConfig(loss="logits", tokens=1, chunk_tokens=chunks[0]), "all_but_embeddings"),
    ]
    timed = lambda *a, **k: lambda: time_stage(*a, precision=precision, steps=args.steps, device=device, **k)
    measures = [teacher_forward]  # each returns one row; all are run once per round
    modes = ([] if args.no_eager else [False]) + ([True] if device.type == "cuda" and not args.no_graph else [])

    def on_each_path(name, cfg, trainable, model):  # a row per path asked for (eager, CUDA graph)
        for graph in modes:
            measures.append(timed(name, stage_step(cfg), trainable, model, teacher, ids, graph=graph))

    for name, cfg, trainable in stages:
        on_each_path(name, cfg, trainable, student)
    for chunk in chunks[1:]:
        measures.append(timed(f"stage 3, divergence chunk {chunk} tokens", stage_step(
            StageConfig(loss="logits", tokens=1, chunk_tokens=chunk)), stages[2][2], student, teacher, ids))
    for form in forms[1:]:
        other = build_student(teacher, StudentConfig(form=form), attention_layers=[]).to(device)
        for name, cfg, trainable in stages:
            measures.append(timed(f"{name}, {form} form", stage_step(cfg), trainable, other, teacher, ids))
    for layers in ([int(i) for i in h.split(",")] for h in args.attention.split(";") if h.strip()):
        hybrid = build_student(teacher, StudentConfig(form=forms[0]), attention_layers=layers).to(device)
        on_each_path(f"stage 3, attention kept at {layers}", stages[2][1], stages[2][2], hybrid)
    if args.recall:
        recall_cfg = StageConfig(loss="logits", tokens=1, chunk_tokens=chunks[0], recall_weight=2.0)
        on_each_path("stage 3 with recall weighting", recall_cfg, stages[2][2], student)
    if args.d_state:
        wide = build_student(teacher, StudentConfig(form=forms[0], d_state=args.d_state), attention_layers=[])
        wide = wide.to(device)
        for name, cfg, trainable in (stages[0], stages[2]):
            on_each_path(f"{name}, d_state {args.d_state}", cfg, trainable, wide)
    for divergence in args.divergences:
        cfg = StageConfig(loss="logits", tokens=1, chunk_tokens=chunks[0], divergence=divergence)
        on_each_path(f"stage 3, {divergence}", cfg, stages[2][2], student)
    for trainable in args.trainables:
        on_each_path(f"stage 3, trains {trainable}", stages[2][1], trainable, student)
    if args.stage1_fp32:
        measures.append(within(stage1_bc_float32, timed(f"{stages[0][0]}, B and C in float32",
                                                        stage_step(stages[0][1]), stages[0][2], student, teacher, ids)))
    ablate = tuple(args.ablate)
    for pieces in [(name,) for name in ablate] + ([ablate] if len(ablate) > 1 else []):
        for graph in modes:
            measures.append(within(lambda pieces=pieces: without(pieces), timed(
                f"stage 3 without {' + '.join(pieces)}", stage_step(stages[2][1]), stages[2][2], student, teacher,
                ids, graph=graph)))
    if not args.no_eager:
        measures.append(timed("stage 3 (full logits reference)", full_logits_step, "all_but_embeddings", student,
                              teacher, ids))
    # Rounds: every row once per round, in order, and the median per row. An eager step on a slow host is bound by
    # its launches and varies from one row to the next; rounds spread that over all rows alike.
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for measure in measures:
            row = measure()
            runs.setdefault(row["stage"], []).append(row)
            print(round_, row, flush=True)
    rows = [(median_row(r), r) for r in runs.values()]

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [
        f"Date {datetime.date.today()}. Device: {name}, torch {torch.__version__}. Teacher "
        f"{'tiny-llama' if args.tiny else 'SmolLM2-135M (random weights)' if args.random_smollm2 else 'SmolLM2-135M-Instruct'} (bf16 weights) -> pure {FORM_NAMES[forms[0]]} student "
        f"(all layers SSD; rows marked with another form: that student); bf16 autocast; batch {args.batch} x "
        f"{args.seq_len} tokens; fused AdamW; stage-3 chunk {chunks[0]} tokens unless marked; mean of {args.steps} steps after 3 warm-up steps"
        f"{f', median of {args.rounds} rounds (each row once a round)' if args.rounds > 1 else ''}; eager steps use "
        "fused AdamW too.",
        "",
    ]
    each = args.rounds > 1  # a column with every round's step time beside the median
    lines += ["| what | tokens/s | ms per step |" + (" ms, each round |" if each else "") + " peak GB |",
              "| --- | --- | --- |" + (" --- |" if each else "") + " --- |"]
    for r, rounds in rows:
        per_round = (" " + ", ".join(f"{x['ms']:.1f}" for x in rounds if "ms" in x) + " |") if each else ""
        if r.get("oom"):
            lines.append(f"| {r['stage']} | out of memory | |{per_round} |")
        elif r.get("failed"):
            lines.append(f"| {r['stage']} | not captured: {r['failed'][:80]} | |{per_round} |")
        else:
            lines.append(f"| {r['stage']} | {r['tok_s']:,.0f} | {r['ms']:.1f} |{per_round} {r['peak_gb']:.1f} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
