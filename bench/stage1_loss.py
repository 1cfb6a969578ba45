"""Stage-1 loss on one GPU: the fused Triton kernel against the materialised PyTorch reference, same run.

    PYTHONPATH=$PWD python bench/stage1_loss.py                       # the table of bench/RESULTS.md
    PYTHONPATH=$PWD python bench/stage1_loss.py --configs 64,4,2 64,8,2   # also time other tile configurations

Shapes: b=1, h=32 query heads (k, B and C per head), d=n=64, bf16 q, k, B, C; log_a and scale (Mamba-2 form, from
dt) in float32. Times are medians of triton.testing.do_bench in ms; "fwd" runs without autograd, "fwd (grad)" is the
forward of a training step (it also does the row-side half of the gradient), "fwd+bwd" is loss and backward.
Peak memory is torch.cuda.max_memory_allocated over one loss + backward, the inputs and gradients included.
"host" is the Python time to issue one loss + backward: where it exceeds the device time, the figure is launch-bound.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from distill.kernels import reference
from distill.kernels.triton_stage1 import _default_config, stage1_loss_triton

GB = 1e9


def make_inputs(L: int, b: int = 1, h: int = 32, d: int = 64, n: int = 64, seed: int = 0):
    """Teacher q, k (bf16, no grad) and the student's leaves log_a, B, C, scale (requiring grad)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    q, k = randn(b, L, h, d, dtype=torch.bfloat16), randn(b, L, h, d, dtype=torch.bfloat16)
    B = (randn(b, L, h, n) / n**0.5).to(torch.bfloat16).requires_grad_()
    C = (randn(b, L, h, n) / n**0.5).to(torch.bfloat16).requires_grad_()
    dt = F.softplus(randn(b, L, h) - 2.0)
    log_a = (-dt * torch.exp(randn(h))).requires_grad_()
    scale = dt.clone().requires_grad_()
    return q, k, d**-0.5, log_a, B, C, scale


def leaves(inputs):
    return [t for t in inputs[3:] if isinstance(t, torch.Tensor)]


def median_ms(fn, grads=()) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")


def peak_gb(fn) -> float:
    """Peak allocated memory over one call of fn, whatever was allocated before it included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GB


def time_ours(inputs, config) -> dict:
    def fwd():
        with torch.no_grad():
            stage1_loss_triton(*inputs, config=config)

    def fwd_grad():
        stage1_loss_triton(*inputs, config=config)

    def fwd_bwd():
        stage1_loss_triton(*inputs, config=config).backward()

    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        fwd_bwd()
    host_ms = (time.perf_counter() - start) * 100  # per call, issued without waiting for the device
    torch.cuda.synchronize()
    for t in leaves(inputs):
        t.grad = None
    return dict(
        host_fwd_bwd=host_ms,
        fwd=median_ms(fwd),
        fwd_grad=median_ms(fwd_grad, leaves(inputs)),
        fwd_bwd=median_ms(fwd_bwd, leaves(inputs)),
        peak=peak_gb(fwd_bwd),
    )


def time_reference(inputs) -> dict:
    def fwd_bwd():
        reference.stage1_loss(*inputs).backward()

    try:
        result = dict(peak=peak_gb(fwd_bwd), fwd_bwd=median_ms(fwd_bwd, leaves(inputs)))
    except torch.OutOfMemoryError:
        result = None
    for t in leaves(inputs):
        t.grad = None
    torch.cuda.empty_cache()
    return result


def agreement(inputs, config) -> str:
    """Relative differences, ours vs the reference (float32 math on the same bf16 values): loss and gradients."""
    grads = {}
    for name, fn in (("ours", lambda: stage1_loss_triton(*inputs, config=config)),
                     ("ref", lambda: reference.stage1_loss(*inputs))):
        for t in leaves(inputs):
            t.grad = None
        loss = fn()
        loss.backward()
        grads[name] = [loss.detach().double()] + [t.grad.double() for t in leaves(inputs)]
    parts = [f"{name} {((o - r).norm() / r.norm()).item():.1e}"
             for name, o, r in zip(("loss", "dlog_a", "dB", "dC", "dscale"), grads["ours"], grads["ref"])]
    for t in leaves(inputs):
        t.grad = None
    return ", ".join(parts)


def fmt(x: float | None, digits: int = 3) -> str:
    return "OOM" if x is None else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 32768])
    parser.add_argument("--configs", nargs="*", default=[],
                        help="extra BLOCK,num_warps,num_stages tile configurations to time (ours only)")
    args = parser.parse_args()

    props = torch.cuda.get_device_properties(0)
    print(f"{datetime.date.today()}  {props.name}  torch {torch.__version__}  triton {triton.__version__}")

    default = _default_config()
    extra = [tuple(int(v) for v in c.split(",")) for c in args.configs]
    rows = []
    for L in args.lengths:
        inputs = make_inputs(L)
        ours = time_ours(inputs, default)
        others = {c: time_ours(inputs, c) for c in extra if c != default}
        if L == min(args.lengths):
            print(f"L={L}: ours vs reference, relative differences: {agreement(inputs, default)}")
        ref = time_reference(inputs)
        rows.append((L, ours, ref, others))
        print(f"L={L} done: ours {ours}, reference {ref}, others {others}", flush=True)
        del inputs
        torch.cuda.empty_cache()

    if extra:
        print("\nOther tile configurations (BLOCK, num_warps, num_stages), ours, ms: fwd / fwd+bwd / peak GB")
        for L, ours, _, others in rows:
            cells = [f"{c}: {r['fwd']:.3f} / {r['fwd_bwd']:.3f} / {r['peak']:.2f}" for c, r in others.items()]
            print(f"L={L}  default {default}: {ours['fwd']:.3f} / {ours['fwd_bwd']:.3f}  |  " + "  |  ".join(cells))

    print(f"\nb=1, h=32, d=n=64, bf16; ours with (BLOCK, num_warps, num_stages) = {default}\n")
    print("| L | ours fwd (ms) | ours fwd, grad mode (ms) | ours fwd+bwd (ms) | ours peak (GB) "
          "| reference fwd+bwd (ms) | reference peak (GB) | speed-up fwd+bwd | memory ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for L, ours, ref, _ in rows:
        speedup = "-" if ref is None else f"{ref['fwd_bwd'] / ours['fwd_bwd']:.1f}x"
        memory = "-" if ref is None else f"{ref['peak'] / ours['peak']:.0f}x"
        print(f"| {L} | {ours['fwd']:.3f} | {ours['fwd_grad']:.3f} | {ours['fwd_bwd']:.3f} | {ours['peak']:.2f} "
              f"| {fmt(None if ref is None else ref['fwd_bwd'], 1)} | {fmt(None if ref is None else ref['peak'], 1)} "
              f"| {speedup} | {memory} |")


if __name__ == "__main__":
    main()
