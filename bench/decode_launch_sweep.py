"""Sweep the decode step's launch shape (BLOCK_P, num_warps) against mamba_ssm's selective_state_update.

    PYTHONPATH=$PWD:$PWD/.peer python3 bench/decode_launch_sweep.py      (GPU; mamba_ssm's Triton files in .peer/)

h = 32, p = n = 64, bf16 inputs, float32 state; microseconds, median CUDA-graph replay. Picks triton_step's
_launch_config; the result is in bench/RESULTS.md.
"""
import sys, torch, torch.nn.functional as F
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".peer"))
from triton.testing import do_bench_cudagraph
from distill.kernels import triton_step, reference
from mamba_ssm.ops.triton.selective_state_update import selective_state_update
h, P, N = 32, 64, 64
for b in (1, 4, 16, 64):
    state = torch.randn(b, h, P, N, device="cuda"); x = torch.randn(b, h, P, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(b, h, N, device="cuda", dtype=torch.bfloat16); C = torch.randn_like(B)
    dt = F.softplus(torch.randn(b, h, device="cuda") - 2); A = -torch.exp(torch.rand(h, device="cuda")); D = torch.randn(h, device="cuda")
    log_a = dt * A
    dt_e, A_e, D_e = dt[..., None].expand(b, h, P), A[:, None, None].expand(h, P, N), D[:, None].expand(h, P)
    bias_e = torch.zeros(h, device="cuda")[:, None].expand(h, P)
    m = do_bench_cudagraph(lambda: selective_state_update(state, x, dt_e, A_e, B, C, D=D_e, dt_bias=bias_e), return_mode="median")
    row = [f"b={b} mamba {m*1000:.3f}us"]
    for block, warps in ((16, 4), (8, 4), (8, 2), (4, 2), (8, 1), (16, 2), (32, 4)):
        triton_step._launch_config = lambda bh, p, block=block, warps=warps: (block, warps)
        y_ref, s_ref = reference.ssd_step(state, x, log_a, B, C, dt, D)
        y, s_new = triton_step.ssd_step_triton(state, x, log_a, B, C, dt, D)
        assert (y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max() < 1e-2
        t = do_bench_cudagraph(lambda: triton_step.ssd_step_triton(state, x, log_a, B, C, dt, D, out_state=state), return_mode="median")
        row.append(f"({block},{warps}) {t*1000:.3f}")
    print(" | ".join(row), flush=True)
