"""Benchmark: our block kernels beside liger-kernel's, forward + backward, in one run; prints a Markdown table.

    python bench/liger_compare.py [--batch 16] [--seq-len 2048] [--reps 20] [--out FILE]
    TRITON_INTERPRET=1 python bench/liger_compare.py --tiny --device cpu   (a smoke run: our Triton kernels
                                                                             interpreted on the CPU)

The project prefers a well-kept library to a hand-written twin and keeps ours only where it is faster: this table
says which. liger-kernel (PyPI `liger-kernel`) is only imported and called, as the peer. Rows, at the stage-3 step
of a SmolLM2-135M student (16 x 2048 tokens, hidden 576, MLP 1536, vocabulary 49,152, heads 9 / 3 of 64):
  RMSNorm fp32/bf16  distill.kernels.rms_norm vs LigerRMSNormFunction (casting "llama": the same rounding as ours);
                     float32 is the student's stream, bf16 (weight too) the bf16 teacher's; fp32 -> bf16 the
                     student's layer norms under autocast (liger's float32 output then cast, as autocast does)
  SwiGLU bf16        distill.kernels.swiglu vs LigerSiLUMulFunction
  forward KL, JSD    distill.stages.divergence.fused_linear_divergence (chunk 4096, bf16 matmul, as training runs
                     it) vs LigerFusedLinearJSDFunction (beta 0 is its forward KL; JSD at beta 0.5)
  rope bf16          ours has no rope kernel: transformers' eager apply_rotary_pos_emb (what the teacher runs)
                     vs liger_rotary_pos_emb, on q, k laid out as the q/k projections leave them
Each op is checked first: ours and liger's on the same inputs, the relative error (norm of the difference over
liger's norm) of the forward output and every gradient, the largest printed. Then each side's forward + backward
is timed (median of --reps after warm-up; CUDA events). The teacher-side ops (bf16 RMSNorm, rope) also get a
forward-only row (no grad), how the frozen teacher runs them. Liger failing on a row leaves its cells empty.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from distill import kernels  # noqa: E402
from distill.stages.divergence import fused_linear_divergence  # noqa: E402

from bench.common import SMOLLM2, TINY, report  # noqa: E402

EPS = 1e-5  # SmolLM2's rms_norm_eps
ROPE_THETA = 10000.0  # the values do not change the time


def load_liger() -> SimpleNamespace | None:
    try:
        from importlib.metadata import version

        from liger_kernel.backends import available_impls
        from liger_kernel.ops import LigerFusedLinearJSDFunction, LigerRMSNormFunction, LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as err:
        print(f"liger-kernel not available ({err}): its columns stay empty")
        return None
    # Which implementation liger's dispatcher picks (CuTe DSL or cuTile where installed, else its Triton).
    impls = {op: (available_impls(op) or ["none"])[0] for op in ("rope", "jsd_loss_and_grad")}
    return SimpleNamespace(version=version("liger_kernel"), impls=impls, rms_norm=LigerRMSNormFunction.apply,
                           swiglu=LigerSiLUMulFunction.apply, fused_jsd=LigerFusedLinearJSDFunction.apply,
                           rope=liger_rotary_pos_emb)


@dataclass
class Case:
    op: str
    shape: str
    inputs: dict[str, torch.Tensor]  # every tensor either side reads; fresh copies for each call
    grads: tuple[str, ...]  # the inputs that take a gradient
    ours: Callable[[dict], object]
    liger: Callable[[dict], object]
    teacher: bool = False  # also time the forward alone, without grad


def head(weight: torch.Tensor) -> SimpleNamespace:
    """What fused_linear_divergence reads of an nn.Linear, around a leaf the bench owns."""
    return SimpleNamespace(weight=weight, bias=None)


def cases(cfg: dict, tokens: tuple[int, int], chunk: int, dev: torch.device, lg: SimpleNamespace | None) -> list:
    b, L = tokens
    n, H, W, V = b * L, cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hq, hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = H // hq
    bf = torch.bfloat16
    out = []
    for dtype, name in ((torch.float32, "fp32"), (bf, "bf16")):
        inp = {"x": torch.randn(n, H, device=dev, dtype=dtype),
               "w": (1 + 0.1 * torch.randn(H, device=dev)).to(dtype)}
        out.append(Case(f"RMSNorm {name}", f"{n} x {H} {name}", inp, ("x", "w"),
                        lambda i: kernels.rms_norm(i["x"], i["w"], EPS),
                        # offset 0, "llama" casting, in_place=True (its default: dx is written over dy)
                        lambda i: lg.rms_norm(i["x"], i["w"], EPS, 0.0, "llama", True, None),
                        teacher=dtype == bf))
    # The student's layer norms under autocast: a float32 stream in, bf16 out for the products that follow (ours
    # writes bf16 itself; liger's output is x's dtype, so autocast's cast follows it, as it followed ours before).
    inp = {"x": torch.randn(n, H, device=dev), "w": 1 + 0.1 * torch.randn(H, device=dev)}
    out.append(Case("RMSNorm fp32 -> bf16", f"{n} x {H} fp32", inp, ("x", "w"),
                    lambda i: kernels.rms_norm(i["x"], i["w"], EPS, bf),
                    lambda i: lg.rms_norm(i["x"], i["w"], EPS, 0.0, "llama", True, None).to(bf)))
    inp = {"gate": torch.randn(n, W, device=dev, dtype=bf), "up": torch.randn(n, W, device=dev, dtype=bf)}
    out.append(Case("SwiGLU", f"{n} x {W} bf16", inp, ("gate", "up"), lambda i: kernels.swiglu(i["gate"], i["up"]),
                    lambda i: lg.swiglu(i["gate"], i["up"])))
    for div, beta, name in (("forward_kl", 0.0, "forward KL"), ("jsd", 0.5, "JSD beta 0.5")):
        inp = {"hs": torch.randn(n, H, device=dev, dtype=bf), "ws": 0.02 * torch.randn(V, H, device=dev, dtype=bf),
               "ht": torch.randn(n, H, device=dev, dtype=bf), "wt": 0.02 * torch.randn(V, H, device=dev, dtype=bf)}
        out.append(Case(
            f"fused linear {name}", f"{n} x {H} -> {V} bf16", inp, ("hs", "ws"),
            lambda i, div=div: fused_linear_divergence(i["hs"], head(i["ws"]), i["ht"], head(i["wt"]), div,
                                                       chunk_tokens=chunk, matmul_dtype=bf)[0],
            # labels None, ignore_index -100, T = 1, dW accumulated in float32 as ours (liger's default: in bf16)
            lambda i, beta=beta: lg.fused_jsd(i["hs"], i["ws"], i["ht"], i["wt"], None, beta, -100, 1.0,
                                              torch.float32, None, None)))
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
    angles = torch.arange(L, device=dev, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[None]  # (1, L, d), as LlamaRotaryEmbedding returns it
    inp = {"q": torch.randn(b, L, hq * d, device=dev, dtype=bf), "k": torch.randn(b, L, hk * d, device=dev, dtype=bf),
           "cos": emb.cos().to(bf), "sin": emb.sin().to(bf)}

    def qk(i):  # (b, heads, L, d) views of the projections' (b, L, heads * d) outputs, as Llama's attention makes
        return i["q"].view(b, L, hq, d).transpose(1, 2), i["k"].view(b, L, hk, d).transpose(1, 2)

    out.append(Case("rope (ours: transformers eager)", f"{b} x {L}, {hq}/{hk} heads x {d} bf16", inp, ("q", "k"),
                    lambda i: apply_rotary_pos_emb(*qk(i), i["cos"], i["sin"]),
                    lambda i: lg.rope(*qk(i), i["cos"], i["sin"]), teacher=True))
    return out


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def upstream(outs: tuple) -> list[torch.Tensor]:
    """The gradients fed back: 1 for a loss (as loss.backward() gives, liger's fast path), else Gaussian."""
    return [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]


def fresh(case: Case) -> dict:
    return {k: v.detach().clone().requires_grad_(k in case.grads) for k, v in case.inputs.items()}


def results(case: Case, fn, douts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Forward outputs, then the gradient of every input in case.grads, on fresh copies of the inputs (liger
    writes over some of its inputs and over the upstream gradients)."""
    inp = fresh(case)
    outs = as_tuple(fn(inp))
    torch.autograd.backward(outs, [g.clone() for g in douts])
    return [o.detach() for o in outs] + [inp[k].grad for k in case.grads]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def median_ms(case: Case, fn, douts: list[torch.Tensor], backward: bool, warmup: int, reps: int,
              dev: torch.device) -> float:
    """Median time of fn's forward (+ backward) over `reps` calls. Inputs and upstream gradients are put back
    before each call, untimed: liger overwrites some in place (RMSNorm's dy, SwiGLU's gate and up, rope's q, k)."""
    inp, dy = fresh(case), [g.clone() for g in douts]
    keep = [(t, t.detach().clone()) for t in [*inp.values(), *dy]]
    times = []
    for rep in range(warmup + reps):
        with torch.no_grad():
            for t, saved in keep:
                t.copy_(saved)
                t.grad = None
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        if backward:
            torch.autograd.backward(as_tuple(fn(inp)), dy)
        else:
            with torch.no_grad():
                fn(inp)
        if dev.type == "cuda":
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            elapsed = (time.perf_counter() - t0) * 1e3
        if rep >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def fmt(t: float | None) -> str:
    return "-" if t is None else f"{t:.3f}"


def bench(case: Case, lg, args, dev: torch.device) -> tuple[list[str], str | None]:
    """The case's rows (fwd + bwd, and fwd alone for a teacher op) and why liger failed, if it did."""
    torch.manual_seed(1)
    douts = upstream(as_tuple(case.ours(fresh(case))))
    ours = results(case, case.ours, douts)
    n_out = len(douts)
    names = [f"out{j}" if n_out > 1 else "out" for j in range(n_out)] + [f"d{k}" for k in case.grads]
    failure, errs = None, None
    if lg is not None:
        try:
            theirs = results(case, case.liger, douts)
            if not all(t.isfinite().all() for t in theirs):  # e.g. liger's bf16 rope under the interpreter
                raise FloatingPointError("non-finite outputs or gradients")
            errs = [rel(a, b) for a, b in zip(ours, theirs)]
        except Exception as err:  # noqa: BLE001  (a peer that cannot run here must not end the run)
            failure = f"{case.op}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(f"liger failed on {failure}", flush=True)
    else:
        failure = f"{case.op}: liger-kernel not installed"
    rows = []
    for backward in (True, False) if case.teacher else (True,):
        t_ours = median_ms(case, case.ours, douts, backward, args.warmup, args.reps, dev)
        t_liger = None if errs is None else median_ms(case, case.liger, douts, backward, args.warmup, args.reps, dev)
        shown = errs if backward or errs is None else errs[:n_out]
        err = "-" if shown is None else f"{max(shown):.1e} ({names[shown.index(max(shown))]})"
        ratio = "-" if t_liger is None else f"{t_liger / t_ours:.2f}x"
        label = case.op + ("" if backward else ", fwd only (no grad)")
        rows.append(f"| {label} | {case.shape} | {fmt(t_ours)} | {fmt(t_liger)} | {ratio} | {err} |")
        print(rows[-1], flush=True)
    return rows, failure


HEADER = ("| op | shape / dtype | ours ms | liger ms | liger / ours | max rel err |\n"
          "| --- | --- | --- | --- | --- | --- |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="our divergence's chunk (training's)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (2 x 32 tokens of bench.common.TINY)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu runs our Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; for a smoke run: TRITON_INTERPRET=1 ... --tiny --device cpu")
    kernels.set_backend("triton")  # ours always through the Triton kernels (interpreted on the CPU)
    cfg, tokens = (TINY, (2, 32)) if args.tiny else (SMOLLM2, (args.batch, args.seq_len))
    n, H, V = tokens[0] * tokens[1], cfg["hidden_size"], cfg["vocab_size"]
    if args.tiny:
        args.warmup, args.reps = min(args.warmup, 1), min(args.reps, 3)
    torch.manual_seed(0)
    lg = load_liger()
    import triton

    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (TRITON_INTERPRET=1)"
    peer = "not installed" if lg is None else (
        f"{lg.version} (dispatcher's picks: rope {lg.impls['rope']}, JSD {lg.impls['jsd_loss_and_grad']})")
    head = (f"Date {datetime.date.today()}. Device: {device}; torch {torch.__version__}, triton {triton.__version__}, "
            f"liger-kernel {peer}. Forward + backward, median of {args.reps} after {args.warmup} warm-up (ms).")
    print(head + "\n" + HEADER, flush=True)
    rows, failures = [], []
    for case in cases(cfg, tokens, args.chunk_tokens, dev, lg):
        case_rows, failure = bench(case, lg, args, dev)
        rows += case_rows
        failures += [failure] if failure else []
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # Liger's own token chunk for its fused JSD on pre-Blackwell GPUs and the CPU: ceil(V / H) chunks' worth.
    liger_chunk = min(n, triton.next_power_of_2(-(-n // -(-V // H))))
    notes = [
        "Notes: liger / ours > 1: ours faster. Max rel err: |ours - liger| / |liger| (2-norms) over the forward "
        "output(s) and every gradient, the largest named (d<input>: that input's gradient).",
        "- Fused linear divergence: liger's generalized JSD weights the teacher by beta as ours does (beta KL(p_t||m)"
        " + (1 - beta) KL(p_s||m), m = beta p_t + (1 - beta) p_s); its beta = 0 is forward KL(p_t||p_s), beta = 1 "
        "reverse KL. Both take the mean over tokens; liger divides the logits by T but does not multiply the loss "
        "by T^2 as ours does (equal at T = 1, used here). Liger's logits come out of the bf16 GEMM in float32; ours "
        "are rounded to bf16 (matmul_dtype=bf16), which the error column shows. Liger chooses its own chunk "
        f"({liger_chunk} tokens here), ours is --chunk-tokens {args.chunk_tokens}. dW accumulates in float32 on "
        "both sides (liger's accum_dtype=torch.float32; its default accumulates in the weight's dtype).",
        "- SwiGLU: liger rounds silu(gate) to bf16 before the product (as F.silu(gate) * up does); ours rounds once.",
        "- Liger writes in place: RMSNorm's dx over dy (in_place=True), SwiGLU's gradients over gate and up, rope "
        "over q and k and their gradients; the bench restores them before every timed call (untimed).",
    ]
    notes += [f"- liger unavailable on this device for {f}" for f in failures]
    report("\n".join([head, "", HEADER, *rows, "", *notes]), args.out)


if __name__ == "__main__":
    main()
