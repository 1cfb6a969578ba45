"""How long the Triton SSD takes to compile, per dtype and chunk_size: the first forward and the first backward, each
in a fresh process with an empty Triton cache (issue 19: float32 at chunk 128 had not compiled after 150 s).

    python bench/ssd_compile_time.py [--timeout 120]

Prints one row per configuration: the chunk the kernels ran at, the seconds of the first forward and of the first
backward (compile included), and the relative error of y against the PyTorch reference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CONFIGS = [("float32", 64), ("float32", 128), ("float32", 100), ("float32", 256), ("bfloat16", 128), ("bfloat16", 256)]

ONE = """
import sys, time, torch
from distill.kernels import reference, triton_ssd
dtype, chunk = getattr(torch, sys.argv[1]), int(sys.argv[2])
g = torch.Generator(device="cuda").manual_seed(0)
b, L, h, p, n = 2, 1024, 8, 64, 64
x = torch.randn(b, L, h, p, device="cuda", generator=g).to(dtype).requires_grad_()
log_a = (-torch.rand(b, L, h, device="cuda", generator=g) * 0.2).requires_grad_()
B = (torch.randn(b, L, h, n, device="cuda", generator=g) / n**0.5).to(dtype).requires_grad_()
C = (torch.randn(b, L, h, n, device="cuda", generator=g) / n**0.5).to(dtype).requires_grad_()
t0 = time.perf_counter()
y, _ = triton_ssd.ssd_chunked_triton(x, log_a, B, C, chunk_size=chunk)
torch.cuda.synchronize(); t1 = time.perf_counter()
y.float().square().sum().backward()
torch.cuda.synchronize(); t2 = time.perf_counter()
ref, _ = reference.ssd_chunked(x.double(), log_a.double(), B.double(), C.double(), chunk_size=64)
err = ((y.double() - ref).norm() / ref.norm()).item()
print(f"{triton_ssd._chunk_block(chunk, dtype)} {t1 - t0:.1f} {t2 - t1:.1f} {err:.1e}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    print("| dtype | chunk_size | runs at | first forward (s) | first backward (s) | rel. error of y |")
    print("|---|---|---|---|---|---|")
    for dtype, chunk in CONFIGS:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            try:
                out = subprocess.run([sys.executable, "-c", ONE, dtype, str(chunk)], capture_output=True, text=True,
                                     env=env, timeout=args.timeout)
                cells = out.stdout.split() if out.returncode == 0 else ["failed:", out.stderr.strip()[-120:], "", ""]
            except subprocess.TimeoutExpired:
                cells = ["", f"> {args.timeout:.0f} (killed)", "", ""]
        print(f"| {dtype} | {chunk} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
