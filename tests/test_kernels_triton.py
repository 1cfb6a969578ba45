"""The Triton SSD kernels against the PyTorch reference: forward and every gradient, on fresh random inputs.

On a CUDA machine the kernels run on the GPU (float64, float32 and bfloat16); elsewhere they run on the CPU through
Triton's interpreter at tiny shapes (L shorter than a chunk, L not a multiple of it, several heads, grouped B/C).
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys

import pytest
import torch

# Without CUDA the kernels run in Triton's interpreter, which must be chosen before triton is imported: @triton.jit
# (triton's own tl.sum and tl.cdiv included) reads TRITON_INTERPRET when it decorates. If something imported triton
# first (transformers does, through torch.distributed), drop those modules so that the import below starts afresh
# (all but the compiled triton._C, which cannot be imported twice).
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    stale = [m for m in sys.modules if (m == "triton" or m.startswith("triton.")) and not m.startswith("triton._C")]
    for name in stale:
        del sys.modules[name]
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from distill.kernels import reference  # noqa: E402


def _load(name: str, kernel: str):
    """Import a kernel module; reload it if it was imported before the interpreter was chosen."""
    module = importlib.import_module(f"distill.kernels.{name}")
    if not CUDA and type(getattr(module, kernel)).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


triton_ssd = _load("triton_ssd", "_ssd_fwd_kernel")
triton_step = _load("triton_step", "_ssd_step_kernel")
triton_conv = _load("triton_conv", "_conv_fwd_kernel")
triton_rmsnorm = _load("triton_rmsnorm", "_rms_fwd_kernel")
triton_swiglu = _load("triton_swiglu", "_swiglu_fwd_kernel")
triton_divergence = _load("triton_divergence", "_divergence_kernel")

DEVICE = "cuda" if CUDA else "cpu"
F64 = torch.float64
# Relative error bounds (||out - ref|| / ||ref||) by the kernel's input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}
_seeds = itertools.count(1234)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all()
    return ((actual - expected).norm() / expected.norm()).item()


def ssd_inputs(
    b: int, L: int, h: int, p: int, n: int, gb: int, gc: int,
    scale: bool = True, D: bool = True, initial_state: bool = True,
) -> list[torch.Tensor | None]:
    """Fresh float64 inputs (a new seed per call): log_a in [-1.01, -0.01], scale in [0.1, 1.1], the rest normal."""
    g = torch.Generator().manual_seed(next(_seeds))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=F64)

    return [
        randn(b, L, h, p),
        -(rand(b, L, h) + 0.01),
        randn(b, L, gb, n),
        randn(b, L, gc, n),
        rand(b, L, h) + 0.1 if scale else None,
        randn(h) if D else None,
        randn(b, h, p, n) if initial_state else None,
    ]


def check_ssd(
    inputs: list[torch.Tensor | None], dtype: torch.dtype, chunk_size: int, reference_fn=reference.ssd_naive,
    make_inputs=None,
) -> None:
    """Forward (y, final state) and the gradient of every tensor input, kernel in `dtype` vs float64 reference.

    The reference sees the inputs rounded to `dtype` (then widened), so only the kernel's own error is measured.
    make_inputs, if given, maps the kernel's leaf tensors to what the kernel is called with (e.g. strided views).
    """
    inputs = [t.to(dtype).to(F64) if t is not None else None for t in inputs]
    ref_in = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    out_in = [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in inputs]
    call_in = make_inputs(out_in) if make_inputs is not None else out_in
    y, final = triton_ssd.ssd_chunked_triton(*call_in, chunk_size=chunk_size)
    y_ref, final_ref = reference_fn(*ref_in)
    assert y.dtype == dtype and final.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(final, final_ref) < TOL[dtype]

    dy, dfinal = (torch.randn_like(t).to(dtype).to(F64) for t in (y_ref, final_ref))
    leaves = [t for t in out_in if t is not None]
    grads = torch.autograd.grad((y * dy.to(DEVICE, dtype)).sum() + (final * dfinal.to(DEVICE, dtype)).sum(), leaves)
    ref_leaves = [t for t in ref_in if t is not None]
    ref_grads = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dfinal).sum(), ref_leaves)
    names = [name for name, t in zip(("x", "log_a", "B", "C", "scale", "D", "initial_state"), inputs) if t is not None]
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad.dtype == dtype, name
        err = rel_err(grad, ref_grad)
        assert err < TOL[dtype], f"d{name}: relative error {err:.2e}"


# (b, L, h, p, n, gb, gc, chunk): L < chunk, L = chunk, L not a multiple of the chunk, per-head and grouped B/C
# (shared B as with GQA teachers, shared C, both), p and n not powers of two, p split across programs, n > p (a
# state larger than the head: student.d_state).
SHAPES = [
    (2, 5, 3, 8, 5, 3, 3, 16),
    (1, 16, 2, 16, 16, 2, 2, 16),
    (2, 37, 4, 8, 5, 1, 4, 16),
    (1, 50, 6, 12, 8, 2, 3, 16),
    (2, 70, 4, 20, 16, 4, 2, 32),
    (2, 37, 4, 16, 32, 2, 4, 16),
]
OPTIONS = [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
DTYPES = [F64, torch.float32] if CUDA else [F64]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-L{}-h{}-p{}-n{}-gb{}-gc{}-T{}".format(*s))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "scale{}-D{}-h0{}".format(*map(int, o)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ssd_chunked_matches_reference(shape, options, dtype) -> None:
    *dims, chunk = shape
    check_ssd(ssd_inputs(*dims, *options), dtype, chunk)


def test_ssd_chunked_float32_interpreted_or_gpu() -> None:
    check_ssd(ssd_inputs(2, 45, 4, 24, 16, 2, 4), torch.float32, 16)


@pytest.mark.parametrize("chunk_size", [100, 128, 256])
def test_ssd_chunked_float32_wide_chunks_run_at_64(monkeypatch, chunk_size) -> None:
    """Float32 at a chunk of 128 (or what rounds to it: 100, mamba_ssm's 256) compiles for minutes on the GPU (exact
    products from scalar FMAs): the kernels run it at 64, the same function; half precision keeps 128."""
    seen = []
    original = triton_ssd._chunk_block
    monkeypatch.setattr(triton_ssd, "_chunk_block", lambda c, d=torch.bfloat16: seen.append(original(c, d)) or seen[-1])
    check_ssd(ssd_inputs(1, 140, 2, 16, 16, 2, 2), torch.float32, chunk_size)
    assert seen and set(seen) == {64}  # forward and backward alike
    assert original(chunk_size, torch.bfloat16) == 128 and original(chunk_size, torch.float64) == 64
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            original(bad, torch.float32)


@pytest.mark.parametrize("block_p,segments", [(16, 1), (64, 3), (16, 4)])
@pytest.mark.parametrize("options", [(True, True, True), (False, False, False)], ids=["all", "none"])
def test_ssd_chunked_p_blocks_and_segments(monkeypatch, block_p: int, segments: int, options) -> None:
    """The layouts for few batch x heads: p split in blocks (dB, dC, dlog_a, dscale summed over blocks) and the
    chunks cut into segments (4 chunks in 3 or 4 segments: one ragged, one a single chunk)."""
    config = lambda batch_heads, dim_p, nchunks, device: (block_p, segments, 4, 1)  # noqa: E731
    monkeypatch.setattr(triton_ssd, "_fwd_config", config)
    monkeypatch.setattr(triton_ssd, "_bwd_config", config)
    check_ssd(ssd_inputs(2, 61, 4, 40, 24, 2, 1, *options), DTYPES[0], 16)


def test_ssd_chunked_strided_inputs() -> None:
    """x, B, C as views into one projection (the Mamba-2 layout), log_a and scale as strided views."""
    b, L, h, p, n = 2, 29, 4, 8, 16

    def views(leaves):
        x, log_a, B, C, scale, D, h0 = leaves
        packed = torch.cat([x.reshape(b, L, h * p), B.reshape(b, L, n), C.reshape(b, L, n)], dim=-1)
        xv, Bv, Cv = packed.split([h * p, n, n], dim=-1)
        la_scale = torch.stack([log_a, scale], dim=-1)  # (b, L, h, 2): every second element
        B1, C1 = Bv.view(b, L, 1, n), Cv.view(b, L, 1, n)
        return [xv.view(b, L, h, p), la_scale[..., 0], B1, C1, la_scale[..., 1], D, h0]

    check_ssd(ssd_inputs(b, L, h, p, n, 1, 1), DTYPES[0], 16, make_inputs=views)


def test_ssd_chunked_matches_reference_chunked_and_inference_path() -> None:
    """Against reference.ssd_chunked; and without autograd (no stored states) the same numbers."""
    inputs = ssd_inputs(2, 41, 4, 16, 16, 4, 4)
    dtype = DTYPES[0]
    check_ssd(inputs, dtype, 16, reference_fn=lambda *a: reference.ssd_chunked(*a, chunk_size=16))
    dev_in = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    with torch.no_grad():
        y, final = triton_ssd.ssd_chunked_triton(*dev_in, chunk_size=16)
    y_ref, final_ref = reference.ssd_chunked(*inputs, chunk_size=16)
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(final, final_ref) < TOL[dtype]


def test_ssd_chunked_gradient_through_final_state_only() -> None:
    """A loss on the final state alone (dy is None in the backward): e.g. a prefill feeding a decode."""
    inputs = ssd_inputs(1, 20, 2, 16, 16, 2, 2)
    dtype = DTYPES[0]
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    _, final = triton_ssd.ssd_chunked_triton(*leaves, chunk_size=16)
    _, final_ref = reference.ssd_naive(*ref_leaves)
    weight = torch.randn_like(final_ref)
    grads = torch.autograd.grad((final * weight.to(DEVICE, dtype)).sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad((final_ref * weight).sum(), ref_leaves, allow_unused=True)
    for grad, ref_grad in zip(grads, ref_grads):
        if ref_grad is None or ref_grad.abs().max() == 0:  # C and D do not reach the final state
            assert grad is None or grad.abs().max() == 0
        else:
            assert rel_err(grad, ref_grad) < TOL[dtype]


@pytest.mark.skipif(not CUDA, reason="bfloat16 tensor-core path: GPU only")
@pytest.mark.parametrize("gb, n", [(8, 64), (2, 64), (2, 128)])
def test_ssd_chunked_bfloat16_model_shape(gb: int, n: int) -> None:
    """bf16 at a model's head size (p = 64; n = 64, or 128: student.d_state=128), several chunks and a ragged tail,
    against float64."""
    check_ssd(ssd_inputs(2, 300, 8, 64, n, gb, 8), torch.bfloat16, 64, reference_fn=reference.ssd_chunked)


def test_ssd_chunked_rejects_bad_shapes() -> None:
    x, log_a, B, C, *_ = ssd_inputs(1, 4, 4, 8, 8, 3, 4, scale=False, D=False, initial_state=False)
    with pytest.raises(ValueError, match="B has 3 groups"):
        triton_ssd.ssd_chunked_triton(x, log_a, B, C)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def step_inputs(b: int, h: int, p: int, n: int, gb: int, gc: int, scale: bool, D: bool):
    g = torch.Generator().manual_seed(next(_seeds))
    randn = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    rand = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    return (
        randn(b, h, p, n), randn(b, h, p), -(rand(b, h) + 0.01), randn(b, gb, n), randn(b, gc, n),
        rand(b, h) + 0.1 if scale else None, randn(h) if D else None,
    )


STEP_SHAPES = [(1, 4, 8, 5, 4, 4, True, True), (3, 6, 20, 16, 2, 3, False, False), (2, 4, 64, 64, 1, 4, True, False),
               (2, 4, 16, 32, 2, 4, True, True)]
STEP_DTYPES = [F64, torch.float32] if CUDA else [F64]


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "b{}-h{}-p{}-n{}-gb{}-gc{}-scale{}-D{}".format(*s))
@pytest.mark.parametrize("dtype", STEP_DTYPES, ids=str)
def test_ssd_step_matches_reference(shape, dtype) -> None:
    inputs = step_inputs(*shape)
    dev = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    y_ref, state_ref = reference.ssd_step(*inputs)
    y, state = triton_step.ssd_step_triton(*dev)
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(state, state_ref) < TOL[dtype]
    in_place = dev[0].clone()
    y2, state2 = triton_step.ssd_step_triton(in_place, *dev[1:], out_state=in_place)
    assert state2 is in_place
    assert rel_err(y2, y_ref) < TOL[dtype] and rel_err(in_place, state_ref) < TOL[dtype]


@pytest.mark.skipif(not CUDA, reason="bfloat16 inputs with a float32 state: GPU only")
def test_ssd_step_bfloat16_inputs_float32_state() -> None:
    state, x, log_a, B, C, scale, D = step_inputs(16, 8, 64, 64, 2, 2, True, True)
    y_ref, state_ref = reference.ssd_step(state, x, log_a, B, C, scale, D)
    bf = lambda t: t.to(DEVICE, torch.bfloat16)  # noqa: E731
    y, new_state = triton_step.ssd_step_triton(
        state.to(DEVICE, torch.float32), bf(x), bf(log_a), bf(B), bf(C), bf(scale), bf(D)
    )
    y_ref2, state_ref2 = reference.ssd_step(state, *(t.bfloat16().double() for t in (x, log_a, B, C, scale, D)))
    assert new_state.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert rel_err(new_state, state_ref2) < 1e-5 and rel_err(y, y_ref2) < 1e-2
    assert rel_err(y, y_ref) < 3e-2


@pytest.mark.parametrize(
    "b,h,p,n,gb,gc,k,bias,activation",
    [(2, 4, 8, 5, 4, 4, 4, True, "silu"), (3, 6, 20, 16, 2, 3, 4, False, None), (1, 4, 16, 16, 1, 1, 2, True, "silu"),
     (2, 4, 16, 32, 2, 4, 4, True, "silu")],
)
def test_conv_ssd_step_matches_reference(b, h, p, n, gb, gc, k, bias, activation) -> None:
    state, x, log_a, B, C, scale, D = step_inputs(b, h, p, n, gb, gc, True, True)
    channels = h * p + (gb + gc) * n
    g = torch.Generator().manual_seed(next(_seeds))
    conv_state = torch.randn(b, channels, k - 1, generator=g, dtype=F64)
    xbc = torch.randn(b, channels, generator=g, dtype=F64)
    weight = torch.randn(channels, k, generator=g, dtype=F64)
    conv_bias = torch.randn(channels, generator=g, dtype=F64) if bias else None

    u, conv_ref = reference.causal_conv1d_step(conv_state, xbc, weight, conv_bias)
    u = F.silu(u) if activation == "silu" else u
    xu, Bu, Cu = u.split([h * p, gb * n, gc * n], dim=1)
    y_ref, state_ref = reference.ssd_step(
        state, xu.reshape(b, h, p), log_a, Bu.reshape(b, gb, n), Cu.reshape(b, gc, n), scale, D
    )

    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    in_place = dev(state).clone()
    y, new_conv, new_state = triton_step.conv_ssd_step_triton(
        dev(conv_state), dev(xbc), dev(weight), dev(conv_bias), in_place, dev(log_a), dev(scale), dev(D),
        groups_b=gb, groups_c=gc, activation=activation, out_state=in_place,
    )
    assert new_state is in_place
    assert rel_err(y, y_ref) < TOL[F64] and rel_err(new_state, state_ref) < TOL[F64]
    assert rel_err(new_conv, conv_ref) < TOL[F64]


# -- the short causal conv ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b, L, c, k, bias, dtype",
    [
        (2, 70, 100, 4, True, torch.float32),  # two L blocks and two c blocks, both partial
        (1, 2, 37, 4, False, torch.float32),  # shorter than the kernel: zeros before the start, final state padded
        (3, 65, 64, 2, True, torch.float32),
        (2, 33, 20, 1, True, torch.float32),  # k = 1: a per-channel scale, an empty final state
        (2, 70, 100, 4, True, torch.bfloat16),
    ],
)
def test_causal_conv_matches_reference(b, L, c, k, bias, dtype) -> None:
    """Forward, final state and every gradient (x, weight, bias) against the float64 reference, with x a strided
    slice of a wider tensor, as the mixer hands it over (its [x | B | C] columns of in_proj's output)."""
    g = torch.Generator().manual_seed(next(_seeds))
    wide = torch.randn(b, L, c + 7, generator=g, dtype=F64)
    w = torch.randn(c, k, generator=g, dtype=F64)
    bvec = torch.randn(c, generator=g, dtype=F64) if bias else None
    dy = torch.randn(b, L, c, generator=g, dtype=F64)

    ref_in = [wide[..., 3 : 3 + c].clone().requires_grad_(), w.clone().requires_grad_()]
    ref_in += [bvec.clone().requires_grad_()] if bias else []
    y_ref, state_ref = reference.causal_conv1d(ref_in[0], ref_in[1], ref_in[2] if bias else None)
    (y_ref * dy).sum().backward()

    dev_wide = wide.to(DEVICE, dtype).requires_grad_()
    dev_w = w.to(DEVICE, dtype).requires_grad_()
    dev_b = bvec.to(DEVICE, dtype).requires_grad_() if bias else None
    x = dev_wide[..., 3 : 3 + c]
    assert not x.is_contiguous()
    y, state = triton_conv.causal_conv1d_triton(x, dev_w, dev_b)
    (y.float() * dy.to(DEVICE).float()).sum().backward()
    tol = TOL[dtype]
    assert y.dtype == dtype and state.shape == (b, c, k - 1)
    assert rel_err(y, y_ref) < tol
    if k > 1:
        assert rel_err(state, state_ref) < tol
    assert rel_err(dev_wide.grad[..., 3 : 3 + c], ref_in[0].grad) < tol
    assert dev_wide.grad[..., :3].abs().max() == 0 and dev_wide.grad[..., 3 + c :].abs().max() == 0
    assert rel_err(dev_w.grad, ref_in[1].grad) < tol
    if bias:
        assert rel_err(dev_b.grad, ref_in[2].grad) < tol


def test_causal_conv_dispatch_and_bad_input() -> None:
    from distill import kernels

    x = torch.randn(1, 5, 3, device=DEVICE)
    w, state = torch.randn(3, 4, device=DEVICE), torch.randn(1, 3, 3, device=DEVICE)
    # A cached conv continues from its state through the reference, on any device.
    y, _ = kernels.causal_conv1d(x, w, None, state)
    y_ref, _ = reference.causal_conv1d(x, w, None, state)
    assert torch.allclose(y, y_ref)
    with pytest.raises(ValueError, match="no initial_state"):
        triton_conv.causal_conv1d_triton(x, w, None, state)
    with pytest.raises(ValueError, match="weight must have shape"):
        triton_conv.causal_conv1d_triton(x, torch.randn(4, 4, device=DEVICE))



# -- the block's RMSNorm and SwiGLU gate ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, x_dtype, w_dtype, out_dtype",
    [
        ((2, 37, 40), torch.float32, torch.float32, None),  # rows not a multiple of the row block, width not 2^k
        ((3, 19, 64), torch.float32, torch.float32, None),
        ((2, 37, 40), torch.bfloat16, torch.float32, None),  # a bf16 stream under fp32 weights: output fp32
        ((2, 37, 40), torch.bfloat16, torch.bfloat16, None),  # a bf16 teacher
        ((130, 24), torch.float32, torch.float32, None),  # 2-D; several backward programs, each over several row blocks
        ((2, 37, 40), torch.float32, torch.float32, torch.bfloat16),  # the student's layer norms under autocast
    ],
)
def test_rms_norm_matches_reference(shape, x_dtype, w_dtype, out_dtype) -> None:
    """Forward, dx and dweight against the float64 reference, with x a strided slice (its rows not adjacent); with
    out_dtype, y in that dtype and its gradient arriving in it."""
    g = torch.Generator().manual_seed(next(_seeds))
    d = shape[-1]
    wide = torch.randn(*shape[:-1], d + 5, generator=g, dtype=F64) * 3
    w = torch.randn(d, generator=g, dtype=F64)
    dy = torch.randn(*shape, generator=g, dtype=F64)
    ref_x, ref_w = wide[..., 2 : 2 + d].clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = reference.rms_norm(ref_x, ref_w, 1e-5)
    (y_ref * dy).sum().backward()

    dev_wide = wide.to(DEVICE, x_dtype).requires_grad_()
    dev_w = w.to(DEVICE, w_dtype).requires_grad_()
    x = dev_wide[..., 2 : 2 + d]
    y = triton_rmsnorm.rms_norm_triton(x, dev_w, 1e-5, out_dtype)
    (y.float() * dy.to(DEVICE).float()).sum().backward()
    tol = TOL[torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype, out_dtype) else x_dtype]
    assert y.dtype == (out_dtype or torch.promote_types(x_dtype, w_dtype)) and y.shape == shape
    assert rel_err(y, y_ref) < tol
    assert rel_err(dev_wide.grad[..., 2 : 2 + d], ref_x.grad) < tol
    assert dev_wide.grad[..., :2].abs().max() == 0
    assert dev_w.grad.dtype == w_dtype and rel_err(dev_w.grad, ref_w.grad) < tol


def test_rms_norm_kernel_rounds_as_the_family_does() -> None:
    """For a bf16 teacher the kernel rounds where the eager function does: the normalized x to bf16 before the
    product with the weight, then the product. On the GPU that gives the eager function's values (within one rounding
    of rsqrt's last bit); the Triton interpreter converts float32 to bf16 by truncation, not to nearest, so on the
    CPU the same roundings are checked with truncation: bit for bit but for the rare element where float32 sums in
    another order put the normalized x across a bf16 boundary (one unit in the last place)."""
    g = torch.Generator().manual_seed(next(_seeds))
    x = torch.randn(4, 9, 48, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(48, generator=g).to(DEVICE, torch.bfloat16)
    y = triton_rmsnorm.rms_norm_triton(x, w, 1e-6)
    if CUDA:
        y_ref = reference.rms_norm(x, w, 1e-6)
        assert (y.float() - y_ref.float()).abs().max().item() <= 2 ** -7 * y_ref.float().abs().max().item()
    else:
        truncate = lambda t: (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)  # noqa: E731
        xf = x.float()
        normed = truncate(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
        expected = truncate(w.float() * normed)
        diff, ulp = (y.float() - expected).abs(), torch.exp2(torch.floor(torch.log2(expected.abs())) - 7)
        assert (diff <= ulp).all() and (diff == 0).float().mean() > 0.99
    with pytest.raises(ValueError, match="weight must have shape"):
        triton_rmsnorm.rms_norm_triton(x, w[:5], 1e-6)


@pytest.mark.parametrize(
    "shape, dtype, gate_slice",
    [
        ((2, 33, 50), torch.float32, False),  # sizes not a multiple of the block
        ((3, 700), torch.float32, True),
        ((2, 33, 50), torch.float32, True),  # the gate a column slice of a wider tensor (the mixer's z)
        ((2, 33, 50), torch.bfloat16, True),
    ],
)
def test_swiglu_matches_reference(shape, dtype, gate_slice) -> None:
    """Forward and both gradients against the float64 reference."""
    g = torch.Generator().manual_seed(next(_seeds))
    wide = torch.randn(*shape[:-1], shape[-1] + 9, generator=g, dtype=F64) * 3
    gate = wide[..., 4 : 4 + shape[-1]]
    up, dh = (torch.randn(*shape, generator=g, dtype=F64) * 3 for _ in range(2))
    ref_g, ref_u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h_ref = reference.swiglu(ref_g, ref_u)
    (h_ref * dh).sum().backward()
    dev_wide = wide.to(DEVICE, dtype).requires_grad_()
    dev_g = dev_wide[..., 4 : 4 + shape[-1]] if gate_slice else gate.to(DEVICE, dtype).requires_grad_()
    dev_u = up.to(DEVICE, dtype).requires_grad_()
    assert dev_g.is_contiguous() != gate_slice
    h = triton_swiglu.swiglu_triton(dev_g, dev_u)
    (h.float() * dh.to(DEVICE).float()).sum().backward()
    tol = TOL[dtype]
    assert h.dtype == dtype and h.shape == shape
    assert rel_err(h, h_ref) < tol
    g_grad = dev_wide.grad[..., 4 : 4 + shape[-1]] if gate_slice else dev_g.grad
    assert rel_err(g_grad, ref_g.grad) < tol
    assert rel_err(dev_u.grad, ref_u.grad) < tol
    with pytest.raises(ValueError, match="same shape"):
        triton_swiglu.swiglu_triton(dev_g, dev_u[..., :3])



# -- stage 3's chunk divergence -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "divergence, temperature, ce, dtype, V, block, weighted",
    [
        ("forward_kl", 1.0, False, torch.float32, 333, 64, False),
        ("forward_kl", 2.0, True, torch.float32, 333, 64, False),  # T^2 scaling and the cross-entropy (at T = 1)
        ("reverse_kl", 1.0, False, torch.float32, 333, 64, False),
        ("reverse_kl", 0.7, True, torch.float32, 333, 64, False),
        ("forward_kl", 1.0, True, torch.bfloat16, 333, 64, False),  # bf16 logits, as the bf16 LM head gives them
        ("reverse_kl", 1.0, True, torch.bfloat16, 5003, None, False),  # the default block (2048) and its 8 warps
        ("forward_kl", 1.5, True, torch.float32, 333, 64, True),  # per-row weights (recall weighting)
        ("reverse_kl", 1.0, False, torch.float32, 333, 64, True),
        # the generalized JSD (beta = 0.3: not symmetric), with and without the cross-entropy and weights
        ("jsd", 2.0, False, torch.float32, 333, 64, False),
        ("jsd", 2.0, True, torch.float32, 333, 64, True),
        ("jsd", 1.0, True, torch.bfloat16, 333, 64, False),
        ("jsd", 0.7, False, torch.float32, 333, 64, True),
    ],
)
def test_chunk_divergence_matches_reference(divergence, temperature, ce, dtype, V, block, weighted) -> None:
    """Sums and the student-logit gradient against the float64 reference, vocabulary not a multiple of the block
    (several blocks a row), student logits a strided view, one ignored label; per-row weights where marked."""
    g = torch.Generator().manual_seed(next(_seeds))
    n, beta = 7, 0.3  # beta: the JSD's teacher weight (the KLs ignore it)
    weights = torch.rand(n, generator=g, dtype=F64) * 3 if weighted else None
    wide = torch.randn(n, V + 11, generator=g, dtype=F64) * 4
    s, t = wide[:, 5 : 5 + V], torch.randn(n, V, generator=g, dtype=F64) * 4
    labels = torch.randint(0, V, (n,), generator=g)
    labels[3] = -100
    kl_scale, ce_scale = 0.37, 0.21
    ref = reference.chunk_divergence(s, t, divergence, beta, temperature, kl_scale, labels if ce else None,
                                     ce_scale, F64, weights)
    dev_s, dev_t = wide.to(DEVICE, dtype)[:, 5 : 5 + V], t.to(DEVICE, dtype)
    assert not dev_s.is_contiguous()
    div, ce_sum, grad = triton_divergence.chunk_divergence_triton(
        dev_s, dev_t, divergence, beta, temperature, kl_scale, labels.to(DEVICE) if ce else None, ce_scale,
        torch.float32, block=block, weights=weights.to(DEVICE, torch.float32) if weighted else None,
    )
    # bf16 logits: the reference sees the same rounded values, so only the kernel's float32 arithmetic differs.
    if dtype != F64:
        ref = reference.chunk_divergence(dev_s.double().cpu(), dev_t.double().cpu(), divergence, beta, temperature,
                                         kl_scale, labels if ce else None, ce_scale, F64, weights)
    tol = TOL[torch.float32]
    assert grad.dtype == torch.float32 and grad.shape == (n, V)
    assert abs(div.item() - ref[0].item()) / abs(ref[0].item()) < tol
    if ce:
        assert abs(ce_sum.item() - ref[1].item()) / abs(ref[1].item()) < tol
    else:
        assert ce_sum is None
    # The JSD's gradient on a sharp row is p_top (c - r_top), a small difference: at T = 0.7 float32 itself is off by
    # up to ~2.6e-4 there (autograd in float32; the kernel about half that, 1 input in ~300 above 1e-4).
    assert rel_err(grad, ref[2]) < (3e-4 if divergence == "jsd" and temperature < 1 else tol)


def _peaked_logits(g: torch.Generator, n: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (student, teacher) logits (n, V) whose softmaxes at T <= 2 underflow in float32 over most of the
    vocabulary: row 0 a teacher sure of one token, row 1 a student sure of one, row 2 both sure of the same one,
    row 3 both sure of different ones, the rest ordinary."""
    s, t = torch.randn(n, V, generator=g, dtype=F64) * 4, torch.randn(n, V, generator=g, dtype=F64) * 4
    t[0] = -300.0 + t[0]
    t[0, 5] = 300.0
    s[1] = -300.0 + s[1]
    s[1, 9] = 300.0
    s[2], t[2] = -300.0 + s[2], -300.0 + t[2]
    s[2, 3], t[2, 3] = 280.0, 300.0
    s[3], t[3] = -300.0 + s[3], -300.0 + t[3]
    s[3, 1], t[3, 2] = 300.0, 300.0
    return s, t


@pytest.mark.parametrize("weighted, ce", [(False, False), (True, True)])
def test_chunk_divergence_jsd_peaked_distributions(weighted, ce) -> None:
    """The JSD where p_t or p_s underflow (log m by a stable logaddexp): finite, and the float64 reference's sums and
    gradient, at beta = 0.3 and T = 2."""
    g = torch.Generator().manual_seed(next(_seeds))
    n, V, beta, T = 6, 37, 0.3, 2.0
    s, t = _peaked_logits(g, n, V)
    weights = torch.rand(n, generator=g, dtype=F64) * 3 + 0.1 if weighted else None
    labels = torch.randint(0, V, (n,), generator=g) if ce else None
    dev_labels = labels.to(DEVICE) if ce else None
    div, ce_sum, grad = triton_divergence.chunk_divergence_triton(
        s.to(DEVICE, torch.float32), t.to(DEVICE, torch.float32), "jsd", beta, T, 0.37, dev_labels, 0.21, torch.float32,
        block=16, weights=weights.to(DEVICE, torch.float32) if weighted else None,
    )
    ref = reference.chunk_divergence(s, t, "jsd", beta, T, 0.37, labels, 0.21, F64, weights)
    tol = TOL[torch.float32]
    assert torch.isfinite(div) and abs(div.item() - ref[0].item()) / abs(ref[0].item()) < tol
    if ce:
        assert abs(ce_sum.item() - ref[1].item()) / abs(ref[1].item()) < tol
    assert rel_err(grad, ref[2]) < tol
    # Each peaked row on its own (the ordinary rows would hide an error there).
    for row in range(4):
        _, _, g_row = triton_divergence.chunk_divergence_triton(
            s[row : row + 1].to(DEVICE, torch.float32), t[row : row + 1].to(DEVICE, torch.float32), "jsd", beta, T,
            grad_dtype=torch.float32, block=16)
        r_row = reference.chunk_divergence(s[row : row + 1], t[row : row + 1], "jsd", beta, T, grad_dtype=F64)[2]
        assert (g_row.double().cpu() - r_row).abs().max().item() < tol * max(r_row.abs().max().item(), 1e-6), row


def test_jsd_gradient_closed_form_matches_autograd() -> None:
    """The kernel's hand-derived JSD gradient, d/ds_j = (1 - beta) / T * p_s_j (c - r_j) with r = log m - log p_s and
    c = sum_k p_s_k r_k, and its divergence sum, in float64 against autograd on reference.chunk_divergence."""
    g = torch.Generator().manual_seed(next(_seeds))
    beta, T = 0.3, 2.0
    s, t = _peaked_logits(g, 8, 53)
    a, b = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    d = b - a
    r = torch.logaddexp(torch.full_like(d, torch.log1p(torch.tensor(-beta, dtype=F64)).item()),
                        torch.log(torch.tensor(beta, dtype=F64)) + d)
    c = (a.exp() * r).sum(-1, keepdim=True)
    div = (beta * (b.exp() * (d - r)).sum(-1) - (1 - beta) * c[:, 0]).sum()
    grad = (1 - beta) / T * a.exp() * (c - r)
    ref_div, _, ref_grad = reference.chunk_divergence(s, t, "jsd", beta, T, grad_dtype=F64)
    assert abs(div.item() - ref_div.item()) < 1e-12 * abs(ref_div.item())
    assert rel_err(grad, ref_grad) < 1e-12


def test_chunk_divergence_dispatch_and_bad_input() -> None:
    from distill import kernels

    g = torch.Generator().manual_seed(next(_seeds))
    s, t = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    # The JSD takes the kernel on CUDA, the reference elsewhere; the gradient comes in the dtype asked for.
    div, ce, grad = kernels.chunk_divergence(s.to(DEVICE), t.to(DEVICE), "jsd", 0.3, grad_dtype=torch.bfloat16)
    ref = reference.chunk_divergence(s, t, "jsd", 0.3)
    assert grad.dtype == torch.bfloat16 and ce is None
    assert abs(div.item() - ref[0].item()) < 1e-5 * abs(ref[0].item())
    with pytest.raises(ValueError, match="forward_kl, reverse_kl and jsd"):
        triton_divergence.chunk_divergence_triton(s, t, "tvd")
    with pytest.raises(ValueError, match="0 < beta < 1"):
        triton_divergence.chunk_divergence_triton(s, t, "jsd", 1.0)
    with pytest.raises(ValueError, match="rows, vocabulary"):
        triton_divergence.chunk_divergence_triton(s, t[:, :7])
    with pytest.raises(ValueError, match="weights must have shape"):
        triton_divergence.chunk_divergence_triton(s, t, weights=torch.ones(2))
