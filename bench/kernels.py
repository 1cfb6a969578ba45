"""Benchmark: our Triton SSD kernels against the peers, in one run on one GPU; prints Markdown tables.

    python bench/kernels.py [--sweep | --full-sweep] [--peers mamba,mamba_step,fla] [--shapes 0,1,2,3]
                            [--no-decode] [--out FILE]   (tables: bench/RESULTS.md)

On a fresh machine mamba_ssm's autotuning compiles ~200 configurations first (about 150 s on an H100 machine);
a whole run with every peer should take about 6 minutes (an estimate from two partial runs).

Chunked SSD (bf16, p = n = 64, B/C per head, chunk 64, D on), forward and forward+backward, median of
triton.testing.do_bench:
  ours          distill.kernels.triton_ssd.ssd_chunked_triton, timed with log_a = dt * A computed inside
  mamba_ssm     mamba_chunk_scan_combined (Triton), given dt and A (it forms dt * A itself)
  fla           chunk_simple_gla forward (its backward refuses on Hopper with triton 3.6)
  SDPA          causal flash attention with the same (b, L, h, 64), for scale
Decode (one token, h = 32, p = n = 64, float32 state, bf16 inputs): our ssd_step_triton against mamba_ssm's
selective_state_update (state updated in place by both), and our fused conv + SSD step against a PyTorch conv step
followed by selective_state_update. Kernel times from CUDA-graph replays, and eager times (launch overhead included).

Peers are optional: mamba_ssm is read from ./.peer (its Triton SSD files, never committed), fla from the installed
package; a missing peer leaves its column empty. Correctness: every shape also reports the relative error of our
bf16 outputs and gradients, and of mamba_ssm's, against our kernel run in float32 (itself tested against float64).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from distill.kernels import reference, triton_ssd, triton_step  # noqa: E402

# (b, L, h); the last is a SmolLM2-135M student's stage-3 step (16 x 2048, 9 heads): 144 programs on 132 SMs
SHAPES = [(4, 2048, 32), (1, 8192, 32), (8, 2048, 9), (1, 32768, 32), (16, 2048, 9)]
P = N = 64
CHUNK = 64
DECODE_BATCHES = [1, 4, 16, 64, 256]
DECODE_HEADS = 32
CONV_WIDTH = 4
DEVICE = "cuda"
DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Peers


def load_peers() -> dict:
    peers: dict = {}
    sys.path.insert(0, str(REPO / ".peer"))
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        peers["mamba"] = mamba_chunk_scan_combined
        peers["mamba_step"] = selective_state_update
    except ImportError as err:
        print(f"mamba_ssm not available ({err}); put its Triton SSD files under .peer/mamba_ssm")
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        peers["fla"] = chunk_simple_gla
    except ImportError as err:
        print(f"fla not available ({err})")
    return peers


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the functions timed


def ssd_inputs(b: int, L: int, h: int) -> dict:
    """Mamba-2-like inputs: dt = softplus(N(-2, 1)) in float32, A = -exp(U(0, 2.5)) per head."""
    dev = DEVICE
    return {
        "x": torch.randn(b, L, h, P, device=dev, dtype=DTYPE),
        "dt": F.softplus(torch.randn(b, L, h, device=dev) - 2.0),
        "A": -torch.exp(torch.rand(h, device=dev) * 2.5),
        "B": torch.randn(b, L, h, N, device=dev, dtype=DTYPE) / N**0.5,
        "C": torch.randn(b, L, h, N, device=dev, dtype=DTYPE) / N**0.5,
        "D": torch.randn(h, device=dev),
    }


def ours(inp: dict, chunk: int | None = None) -> torch.Tensor:
    log_a = inp["dt"] * inp["A"]
    return triton_ssd.ssd_chunked_triton(inp["x"], log_a, inp["B"], inp["C"], inp["dt"], inp["D"],
                                         chunk_size=chunk or CHUNK)[0]


def mamba(peers: dict):
    def run(inp: dict) -> torch.Tensor:
        return peers["mamba"](inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], CHUNK, D=inp["D"])

    return run


def fla_forward(peers: dict, inp: dict):
    q, k, v = inp["C"], inp["B"], inp["x"]
    g = (inp["dt"] * inp["A"]).contiguous()

    def run() -> torch.Tensor:
        return peers["fla"](q, k, v, g=g, scale=1.0)[0]

    return run


def sdpa(b: int, L: int, h: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(b, h, L, P, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run, [q, k, v]


def attempt(label: str, timer, *args) -> float | None:
    """A peer's time, or None (with the reason printed) when the peer fails: one peer must not end the run."""
    try:
        return timer(*args)
    except Exception as err:  # noqa: BLE001
        print(f"{label} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        return None


def time_forward(fn) -> float:
    with torch.no_grad():
        return do_bench(fn, return_mode="median")


def time_forward_backward(fn, leaves: list[torch.Tensor]) -> float:
    dy = torch.randn_like(fn())

    def step() -> None:
        fn().backward(dy)

    return do_bench(step, grad_to_none=leaves, return_mode="median")


def leaves_of(inp: dict) -> list[torch.Tensor]:
    return [inp[k].requires_grad_() for k in ("x", "dt", "A", "B", "C", "D")]


# ----------------------------------------------------------------------------------------------------------------
# Correctness at benchmark shapes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grads_of(fn, inp: dict, dy: torch.Tensor) -> list[torch.Tensor]:
    leaves = [inp[k].detach().clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "D")]
    fresh = dict(zip(("x", "dt", "A", "B", "C", "D"), leaves))
    y = fn(fresh)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))


def accuracy(peers: dict, inp: dict) -> dict:
    """Relative errors of y and every gradient, ours (bf16) and mamba_ssm's, against ours in float32."""
    dy = torch.randn_like(inp["x"])
    fp32 = {k: v.detach().float() for k, v in inp.items()}
    reference_out = grads_of(ours, fp32, dy.float())
    names = ["y", "dx", "ddt", "dA", "dB", "dC", "dD"]
    out = {"ours": dict(zip(names, (rel(a, r) for a, r in zip(grads_of(ours, inp, dy), reference_out))))}
    if "mamba" in peers:
        try:
            peer_out = grads_of(mamba(peers), inp, dy)
            out["mamba"] = dict(zip(names, (rel(a, r) for a, r in zip(peer_out, reference_out))))
        except Exception as err:  # noqa: BLE001
            print(f"mamba_ssm accuracy failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tables


def fmt(t: float | None) -> str:
    return "-" if t is None else f"{t:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def bench_ssd(peers: dict, shapes: list[tuple[int, int, int]]) -> tuple[list[str], list[str]]:
    """One row per shape, with triton_ssd's own launch heuristics."""
    rows, acc_rows = [], []
    for b, L, h in shapes:
        inp = ssd_inputs(b, L, h)
        errs = accuracy(peers, inp)
        cells = [
            f"{errs['ours'][k]:.1e}" + (f" / {errs['mamba'][k]:.1e}" if "mamba" in errs else "") for k in errs["ours"]
        ]
        acc_rows.append(f"| {b}, {L}, {h} | " + " | ".join(cells) + " |")
        leaves = leaves_of(inp)
        t = {"ours_fwd": time_forward(lambda: ours(inp))}
        t["ours_fwd_train"] = do_bench(lambda: ours(inp), return_mode="median")  # grad on: stores chunk states
        t["ours_fb"] = time_forward_backward(lambda: ours(inp), leaves)
        if "mamba" in peers:
            run = mamba(peers)
            t["mamba_fwd"] = attempt("mamba_ssm fwd", time_forward, lambda: run(inp))
            t["mamba_fb"] = attempt("mamba_ssm fwd+bwd", time_forward_backward, lambda: run(inp), leaves)
        if "fla" in peers:
            t["fla_fwd"] = attempt("fla fwd", time_forward, fla_forward(peers, {k: v.detach() for k, v in inp.items()}))
        run_sdpa, sdpa_leaves = sdpa(b, L, h)
        t["sdpa_fwd"] = attempt("SDPA fwd", time_forward, run_sdpa)
        t["sdpa_fb"] = attempt("SDPA fwd+bwd", time_forward_backward, run_sdpa, sdpa_leaves)
        del run_sdpa, sdpa_leaves
        g = t.get
        rows.append(
            f"| {b}, {L}, {h} | {fmt(g('ours_fwd'))} | {fmt(g('ours_fwd_train'))} | {fmt(g('mamba_fwd'))} | "
            f"{fmt(g('fla_fwd'))} | {fmt(g('sdpa_fwd'))} | {ratio(g('mamba_fwd'), g('ours_fwd'))} | "
            f"{ratio(g('fla_fwd'), g('ours_fwd'))} | {fmt(g('ours_fb'))} | {fmt(g('mamba_fb'))} | "
            f"{fmt(g('sdpa_fb'))} | "
            f"{ratio(g('mamba_fb'), g('ours_fb'))} |"
        )
        print(rows[-1], flush=True)
        del inp, leaves
        torch.cuda.empty_cache()
    return rows, acc_rows


def bench_decode(peers: dict) -> list[str]:
    rows = []
    h = DECODE_HEADS
    for b in DECODE_BATCHES:
        dev = DEVICE
        state = torch.randn(b, h, P, N, device=dev)
        x = torch.randn(b, h, P, device=dev, dtype=DTYPE)
        B = torch.randn(b, h, N, device=dev, dtype=DTYPE)
        C = torch.randn(b, h, N, device=dev, dtype=DTYPE)
        dt = F.softplus(torch.randn(b, h, device=dev) - 2.0)
        A = -torch.exp(torch.rand(h, device=dev))
        D = torch.randn(h, device=dev)
        log_a = dt * A

        def step_ours() -> None:
            triton_step.ssd_step_triton(state, x, log_a, B, C, dt, D, out_state=state)

        # Check before timing (the in-place updates below move the state).
        y_ref, s_ref = reference.ssd_step(state, x, log_a, B, C, dt, D)
        y, s_new = triton_step.ssd_step_triton(state, x, log_a, B, C, dt, D)
        assert rel(y, y_ref) < 1e-2 and rel(s_new, s_ref) < 1e-5

        times = {"ours": do_bench_cudagraph(step_ours, return_mode="median"),
                 "ours_eager": do_bench(step_ours, return_mode="median")}
        if "mamba_step" in peers:
            dt_e, A_e, D_e = dt[..., None].expand(b, h, P), A[:, None, None].expand(h, P, N), D[:, None].expand(h, P)
            # mamba_ssm reads dt_bias's strides even when it is None (its tie_hdim check): pass a zero bias.
            bias_e = torch.zeros(h, device=dev)[:, None].expand(h, P)

            def step_mamba() -> None:
                peers["mamba_step"](state, x, dt_e, A_e, B, C, D=D_e, dt_bias=bias_e)

            times["mamba"] = attempt("mamba_ssm step", do_bench_cudagraph, step_mamba, 20, None, None, "median")
            times["mamba_eager"] = attempt("mamba_ssm step eager", do_bench, step_mamba, 25, 100, None, None, "median")

        # One token through conv + SiLU + SSD: fused, against a PyTorch conv step and selective_state_update.
        channels = h * P + 2 * h * N
        conv_state = torch.randn(b, channels, CONV_WIDTH - 1, device=dev, dtype=DTYPE)
        xbc = torch.randn(b, channels, device=dev, dtype=DTYPE)
        weight = torch.randn(channels, CONV_WIDTH, device=dev, dtype=DTYPE)
        bias = torch.randn(channels, device=dev, dtype=DTYPE)

        def conv_ours() -> None:
            triton_step.conv_ssd_step_triton(
                conv_state, xbc, weight, bias, state, log_a, dt, D, groups_b=h, groups_c=h, out_state=state
            )

        times["conv_ours"] = do_bench_cudagraph(conv_ours, return_mode="median")
        times["conv_ours_eager"] = do_bench(conv_ours, return_mode="median")
        if "mamba_step" in peers:

            def conv_mamba() -> None:
                u, _ = reference.causal_conv1d_step(conv_state, xbc, weight, bias)
                xs, Bs, Cs = F.silu(u).split([h * P, h * N, h * N], dim=1)
                peers["mamba_step"](state, xs.view(b, h, P), dt_e, A_e, Bs.view(b, h, N), Cs.view(b, h, N), D=D_e,
                                   dt_bias=bias_e)

            times["conv_mamba"] = attempt(
                "conv + mamba_ssm step", do_bench_cudagraph, conv_mamba, 20, None, None, "median"
            )
            times["conv_mamba_eager"] = attempt(
                "conv + mamba_ssm step eager", do_bench, conv_mamba, 25, 100, None, None, "median"
            )
        g = times.get
        ms_to_us = lambda t: None if t is None else t * 1000  # noqa: E731
        rows.append(
            f"| {b} | {fmt(ms_to_us(g('ours')))} | {fmt(ms_to_us(g('mamba')))} | {ratio(g('mamba'), g('ours'))} | "
            f"{fmt(ms_to_us(g('ours_eager')))} | {fmt(ms_to_us(g('mamba_eager')))} | "
            f"{fmt(ms_to_us(g('conv_ours')))} | {fmt(ms_to_us(g('conv_mamba')))} | "
            f"{ratio(g('conv_mamba'), g('conv_ours'))} | "
            f"{fmt(ms_to_us(g('conv_ours_eager')))} | {fmt(ms_to_us(g('conv_mamba_eager')))} |"
        )
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Launch-configuration sweep (to choose triton_ssd's _fwd_config / _bwd_config)


FWD_CONFIGS = [(bp, 1, 4, st) for bp in (16, 32, 64) for st in (1, 2, 3)] + [(bp, 1, 8, 2) for bp in (16, 32, 64)]
BWD_CONFIGS = [(64, 1, w, st) for w in (4, 8) for st in (1, 2)] + [(32, 1, 8, 1)]
SEGMENTS = (1, 2, 4, 8, 16, 32)


def use_configs(fwd: tuple | None, bwd: tuple | None) -> None:
    """Override triton_ssd's launch heuristics with (BLOCK_P, segments, num_warps, num_stages); None restores them."""
    triton_ssd._fwd_config = (lambda *a: fwd) if fwd else DEFAULT_CONFIGS[0]
    triton_ssd._bwd_config = (lambda *a: bwd) if bwd else DEFAULT_CONFIGS[1]


DEFAULT_CONFIGS = (triton_ssd._fwd_config, triton_ssd._bwd_config)


def heuristics(b: int, L: int, h: int) -> tuple[tuple, tuple]:
    nchunks = triton.cdiv(L, CHUNK)
    dev = torch.device(DEVICE)
    return DEFAULT_CONFIGS[0](b * h, P, nchunks, dev), DEFAULT_CONFIGS[1](b * h, P, nchunks, dev)


def sweep(shapes: list[tuple[int, int, int]], full: bool) -> list[str]:
    """Time launch configurations at each shape: segment counts (no recompilation) and, if `full`, the
    (BLOCK_P, warps, stages) grid. Reports only: the tables use the shipped heuristics."""
    lines = []
    for b, L, h in shapes:
        inp = ssd_inputs(b, L, h)
        leaves = leaves_of(inp)
        fwd_h, bwd_h = heuristics(b, L, h)
        nchunks = triton.cdiv(L, CHUNK)
        segs = [S for S in SEGMENTS if S <= nchunks]
        fwd, bwd = [], []
        for S in segs:
            use_configs((fwd_h[0], S, *fwd_h[2:]), None)
            fwd.append((time_forward(lambda: ours(inp)), f"S={S}"))
        for S in segs:
            use_configs(None, (bwd_h[0], S, *bwd_h[2:]))
            bwd.append((time_forward_backward(lambda: ours(inp), leaves), f"S={S}"))
        if full:
            for cfg in FWD_CONFIGS:
                use_configs(cfg, None)
                fwd.append((time_forward(lambda: ours(inp)), str(cfg)))
            for cfg in BWD_CONFIGS:
                use_configs(None, cfg)
                bwd.append((time_forward_backward(lambda: ours(inp), leaves), str(cfg)))
        use_configs(None, None)
        line = (
            f"- {b}, {L}, {h}: heuristics fwd {fwd_h}, bwd {bwd_h}; forward: "
            + ", ".join(f"{c} {t:.3f}" for t, c in fwd)
            + "; forward+backward (forward at its heuristic): "
            + ", ".join(f"{c} {t:.3f}" for t, c in bwd)
        )
        print(line, flush=True)
        lines.append(line)
        del inp, leaves
        torch.cuda.empty_cache()
    return lines


# ----------------------------------------------------------------------------------------------------------------


SSD_HEADER = (
    "| b, L, h | ours fwd | ours fwd (grad on) | mamba_ssm fwd | fla fwd | SDPA fwd | mamba/ours fwd | fla/ours fwd "
    "| ours fwd+bwd | mamba_ssm fwd+bwd | SDPA fwd+bwd | mamba/ours fwd+bwd |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)
ACC_HEADER = (
    "| b, L, h | y | dx | ddt | dA | dB | dC | dD |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)
DECODE_HEADER = (
    "| batch | ours step (graph) | mamba_ssm step (graph) | mamba/ours | ours eager | mamba eager "
    "| ours conv+step (graph) | torch conv + mamba step (graph) | ratio | ours conv+step eager "
    "| torch conv + mamba eager |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    global CHUNK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time segment counts (cheap: no recompilation)")
    parser.add_argument("--full-sweep", action="store_true", help="--sweep plus BLOCK_P x warps x stages")
    parser.add_argument("--peers", default="mamba,mamba_step,fla", help="peers to load (comma list; '' for none)")
    parser.add_argument("--shapes", default="0,1,2,3", help="indices into SHAPES")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--chunk", type=int, default=64, help="SSD chunk length, ours and the peers' (student.chunk_size)")
    parser.add_argument("--out", type=Path, help="write the Markdown tables here")
    args = parser.parse_args()
    CHUNK = args.chunk
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",") if i]  # --shapes "" : decode only
    torch.manual_seed(0)
    peers = load_peers()
    device = torch.cuda.get_device_name()
    head = (
        f"Device: {device}; torch {torch.__version__}, triton {triton.__version__}; bf16, p = n = {P}, "
        f"B/C per head, chunk {CHUNK}; times in ms, median of triton.testing.do_bench; ratios = peer / ours "
        f"(> 1: ours faster). Date {datetime.date.today()}."
    )
    print(head)
    peers = {k: v for k, v in peers.items() if k in args.peers.split(",")}
    sweep_lines = sweep(shapes, args.full_sweep) if args.sweep or args.full_sweep else []
    print(SSD_HEADER)
    rows, acc_rows = bench_ssd(peers, shapes)
    print("\nRelative error vs our kernel in float32 (ours bf16 / mamba_ssm bf16):\n" + ACC_HEADER)
    print("\n".join(acc_rows))
    decode_rows = [] if args.no_decode else bench_decode(peers)
    text = "\n".join(
        [head, "", "## Chunked SSD", "", SSD_HEADER, *rows, "", "Relative error against our kernel in float32 "
         "(ours bf16 / mamba_ssm bf16):", "", ACC_HEADER, *acc_rows]
        + ([] if not decode_rows else ["", f"## Decode step (h = {DECODE_HEADS}, p = n = {P}; microseconds)", "",
                                       DECODE_HEADER, *decode_rows])
        + ([] if not sweep_lines else ["", "## Launch sweep (ms; the tables above use the shipped heuristics)", "",
                                       *sweep_lines])
    )
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
