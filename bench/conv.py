"""Benchmark: the mixer's short causal conv, our Triton kernel against PyTorch's grouped `F.conv1d` (cuDNN).

    python bench/conv.py [--shapes "16,2048,1344;4,2048,1344;1,8192,4608"] [--out FILE]

x is a (b, L, c) bf16 slice of a wider tensor, as in the mixer (the [x | B | C] columns of in_proj's output; c = 1344
for SmolLM2-135M's students), k = 4, with bias. "torch" is `distill.kernels.reference.causal_conv1d`, the path the
mixer took before the kernel: transpose and concatenate, then `F.conv1d(groups=c)`. Times: median of
`triton.testing.do_bench` (ms); forward, and forward + backward (gradients of x, weight and bias). The relative
error of ours against the float64 reference is printed beside each shape.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.kernels import reference  # noqa: E402
from distill.kernels.triton_conv import causal_conv1d_triton  # noqa: E402

from bench.common import report  # noqa: E402


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16,2048,1344;4,2048,1344;1,8192,4608")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for spec in args.shapes.split(";"):
        b, L, c = (int(v) for v in spec.split(","))
        wide = torch.randn(b, L, c + 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(c, args.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(b, L, c, device="cuda", dtype=torch.bfloat16)

        def x():
            return wide[..., 32 : 32 + c]

        y, _ = causal_conv1d_triton(x(), w, bias)
        y_ref, _ = reference.causal_conv1d(x().double(), w.double(), bias.double())
        err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
        row = {"shape": f"{b}, {L}, {c}", "err": err}
        for name, fn in (("ours", causal_conv1d_triton), ("torch", reference.causal_conv1d)):
            with torch.no_grad():
                row[f"{name}_fwd"] = triton.testing.do_bench(lambda: fn(x(), w, bias), return_mode="median")

            def fwd_bwd():
                out, _ = fn(x(), w, bias)
                torch.autograd.grad(out, (wide, w, bias), dy)

            row[f"{name}_fb"] = triton.testing.do_bench(fwd_bwd, return_mode="median")
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"Date {datetime.date.today()}. Device: {torch.cuda.get_device_name()}, torch {torch.__version__}. bf16, "
        f"k = {args.k}, bias; x a strided slice; ms, median of do_bench.",
        "",
        "| b, L, c | ours fwd | torch fwd | torch/ours | ours fwd+bwd | torch fwd+bwd | torch/ours | rel. err (bf16) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['ours_fwd']:.3f} | {r['torch_fwd']:.3f} | {r['torch_fwd'] / r['ours_fwd']:.2f}x | "
            f"{r['ours_fb']:.3f} | {r['torch_fb']:.3f} | {r['torch_fb'] / r['ours_fb']:.2f}x | {r['err']:.1e} |"
        )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
