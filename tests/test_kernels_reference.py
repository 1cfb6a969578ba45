"""The reference SSD math against its own definition (the time loop) and against explicit formulas, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from distill.kernels.reference import (
    attention_matrix,
    causal_conv1d,
    causal_conv1d_step,
    segment_sum,
    ssd_chunked,
    ssd_materialized,
    ssd_matrix,
    ssd_naive,
    ssd_step,
    stage1_loss,
)

F64 = torch.float64
TOL = 1e-10


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def ssd_inputs(
    seed: int,
    b: int = 2,
    L: int = 13,
    h: int = 4,
    p: int = 3,
    n: int = 5,
    gb: int | None = None,
    gc: int | None = None,
    with_scale: bool = True,
    with_D: bool = True,
    with_initial_state: bool = True,
    dtype: torch.dtype = F64,
) -> dict[str, torch.Tensor | None]:
    """Fresh random SSD inputs: log_a in [-1.01, -0.01], scale in [0.1, 1.1], everything else standard normal."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=dtype)

    gb, gc = gb or h, gc or h
    return {
        "x": randn(b, L, h, p),
        "log_a": -(rand(b, L, h) + 0.01),
        "B": randn(b, L, gb, n),
        "C": randn(b, L, gc, n),
        "scale": rand(b, L, h) + 0.1 if with_scale else None,
        "D": randn(h) if with_D else None,
        "initial_state": randn(b, h, p, n) if with_initial_state else None,
    }


# (L, chunk_size): L = 1, L < chunk, L not a multiple of chunk, L a multiple, a single full chunk, chunk 1.
LENGTHS = [(1, 4), (3, 8), (13, 4), (16, 4), (16, 16), (7, 1), (37, 8)]
# (h, gb, gc): plain multi-head, shared B (GQA-like), shared C, different groupings on both (lcm = h).
GROUPS = [(4, None, None), (4, 1, 4), (4, 4, 2), (6, 2, 3), (1, None, None)]
# (scale, D, initial_state) switched on and off.
OPTIONS = [(True, True, True), (False, False, False), (True, False, False), (False, True, True)]


def naive(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return ssd_naive(**inputs)


@pytest.mark.parametrize("L,chunk_size", LENGTHS)
@pytest.mark.parametrize("h,gb,gc", GROUPS)
def test_chunked_and_materialized_match_naive(L: int, chunk_size: int, h: int, gb: int, gc: int) -> None:
    for i, (with_scale, with_D, with_init) in enumerate(OPTIONS):
        inputs = ssd_inputs(1000 * L + 10 * h + i, L=L, h=h, gb=gb, gc=gc, with_scale=with_scale, with_D=with_D,
                            with_initial_state=with_init)
        y_ref, state_ref = naive(inputs)
        y, state = ssd_chunked(**inputs, chunk_size=chunk_size)
        assert rel_err(y, y_ref) < TOL and rel_err(state, state_ref) < TOL
        y, state = ssd_materialized(**inputs)
        assert rel_err(y, y_ref) < TOL and rel_err(state, state_ref) < TOL


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16, 64])
def test_chunked_independent_of_chunk_size(chunk_size: int) -> None:
    inputs = ssd_inputs(7, L=29, h=6, gb=3, gc=2)
    y_ref, state_ref = naive(inputs)
    y, state = ssd_chunked(**inputs, chunk_size=chunk_size)
    assert rel_err(y, y_ref) < TOL and rel_err(state, state_ref) < TOL


@pytest.mark.parametrize("h,gb,gc", GROUPS)
@pytest.mark.parametrize("with_scale,with_D,with_init", OPTIONS[:2])
def test_repeated_step_matches_naive(h: int, gb: int, gc: int, with_scale: bool, with_D: bool, with_init: bool) -> None:
    inputs = ssd_inputs(11 + h, L=9, h=h, gb=gb, gc=gc, with_scale=with_scale, with_D=with_D,
                        with_initial_state=with_init)
    y_ref, state_ref = naive(inputs)
    x, log_a, B, C, scale = (inputs[k] for k in ("x", "log_a", "B", "C", "scale"))
    b, L, h, p = x.shape
    state = inputs["initial_state"]
    if state is None:
        state = torch.zeros(b, h, p, B.shape[-1], dtype=F64)
    ys = []
    for t in range(L):
        y_t, state = ssd_step(state, x[:, t], log_a[:, t], B[:, t], C[:, t],
                              None if scale is None else scale[:, t], inputs["D"])
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=1), y_ref) < TOL and rel_err(state, state_ref) < TOL


def test_chunked_continues_from_its_final_state() -> None:
    """Two halves, the second started from the first's final state, equal the whole sequence."""
    inputs = ssd_inputs(3, L=21, h=4, gb=2, gc=1)
    y_ref, state_ref = ssd_chunked(**inputs, chunk_size=4)
    first = {k: (v[:, :10] if k in ("x", "log_a", "B", "C", "scale") else v) for k, v in inputs.items()}
    second = {k: (v[:, 10:] if k in ("x", "log_a", "B", "C", "scale") else v) for k, v in inputs.items()}
    y1, state1 = ssd_chunked(**first, chunk_size=4)
    y2, state2 = ssd_chunked(**{**second, "initial_state": state1}, chunk_size=4)
    assert rel_err(torch.cat([y1, y2], dim=1), y_ref) < TOL and rel_err(state2, state_ref) < TOL


GRAD_NAMES = ("x", "log_a", "B", "C", "scale", "D", "initial_state")


def grads_of(fn, inputs: dict, seed: int) -> list[torch.Tensor]:
    """Gradients of a random projection of (y, final_state) with respect to every input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y, state = fn(**leaves)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=F64)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=g, dtype=F64)).sum()
    return list(torch.autograd.grad(loss, [leaves[k] for k in GRAD_NAMES]))


@pytest.mark.parametrize("L,chunk_size", [(1, 4), (13, 4), (16, 8)])
@pytest.mark.parametrize("h,gb,gc", [(4, 1, 4), (6, 2, 3)])
def test_gradients_match_naive(L: int, chunk_size: int, h: int, gb: int, gc: int) -> None:
    inputs = ssd_inputs(21 + L, L=L, h=h, gb=gb, gc=gc)
    expected = grads_of(ssd_naive, inputs, seed=5)
    chunked = grads_of(lambda **kw: ssd_chunked(**kw, chunk_size=chunk_size), inputs, seed=5)
    materialized = grads_of(ssd_materialized, inputs, seed=5)
    for name, want, got_c, got_m in zip(GRAD_NAMES, expected, chunked, materialized):
        assert want.abs().max() > 0, name
        assert rel_err(got_c, want) < TOL, f"ssd_chunked d/d{name}"
        assert rel_err(got_m, want) < TOL, f"ssd_materialized d/d{name}"


def test_strong_decay_long_sequence_stays_finite() -> None:
    """Cumulative log decays of -1e4 must not give inf/NaN values or gradients (masking before exp)."""
    inputs = ssd_inputs(9, L=200, h=2, with_initial_state=True)
    inputs["log_a"] = inputs["log_a"] * 50.0
    chunked = grads_of(lambda **kw: ssd_chunked(**kw, chunk_size=32), inputs, seed=1)
    expected = grads_of(ssd_naive, inputs, seed=1)
    for name, got, want in zip(GRAD_NAMES, chunked, expected):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < TOL, name
    M = ssd_matrix(inputs["log_a"].requires_grad_(True), inputs["B"], inputs["C"], inputs["scale"])
    (grad,) = torch.autograd.grad(M.sum(), inputs["log_a"])
    assert torch.isfinite(M).all() and torch.isfinite(grad).all()


def test_ssd_matrix_equals_double_loop() -> None:
    inputs = ssd_inputs(4, b=2, L=7, h=6, gb=2, gc=3)
    log_a, B, C, scale = (inputs[k] for k in ("log_a", "B", "C", "scale"))
    M = ssd_matrix(log_a, B, C, scale)
    b, L, h = log_a.shape
    expected = torch.zeros(b, h, L, L, dtype=F64)
    for bi in range(b):
        for head in range(h):
            B_head, C_head = B[bi, :, head // (h // 2)], C[bi, :, head // (h // 3)]
            for i in range(L):
                for j in range(i + 1):
                    decay = math.exp(log_a[bi, j + 1 : i + 1, head].sum().item())
                    expected[bi, head, i, j] = (C_head[i] @ B_head[j]) * decay * scale[bi, j, head]
    assert rel_err(M, expected) < TOL
    assert rel_err(ssd_matrix(log_a, B, C), expected / scale.transpose(1, 2)[:, :, None, :]) < TOL


def test_segment_sum() -> None:
    log_a = -torch.rand(3, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    seg = segment_sum(log_a)
    for i in range(6):
        for j in range(6):
            if i >= j:
                assert abs(seg[1, i, j] - log_a[1, j + 1 : i + 1].sum()) < 1e-14
            else:
                assert seg[1, i, j] == float("-inf")


def test_chunked_float32_close_to_float64() -> None:
    inputs = ssd_inputs(12, b=2, L=150, h=4, p=16, n=16, gb=2, gc=4)
    y64, state64 = ssd_chunked(**inputs, chunk_size=64)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    y32, state32 = ssd_chunked(**inputs32, chunk_size=64)
    assert y32.dtype == torch.float32 and state32.dtype == torch.float32
    assert rel_err(y32.double(), y64) < 1e-4 and rel_err(state32.double(), state64) < 1e-4


# ------------------------------------------------------------------------------------------------ causal conv


def conv_inputs(seed: int, b: int = 2, L: int = 11, c: int = 5, k: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=F64) for shape in ((b, L, c), (c, k), (c,), (b, c, k - 1)))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv1d_matches_loop(k: int, with_bias: bool) -> None:
    x, weight, bias, state0 = conv_inputs(k, k=k)
    bias = bias if with_bias else None
    y, final = causal_conv1d(x, weight, bias, state0)
    b, L, c = x.shape
    inputs = torch.cat([state0.transpose(1, 2), x], dim=1)  # (b, k-1+L, c), oldest first
    expected = torch.zeros(b, L, c, dtype=F64)
    for t in range(L):
        for j in range(k):
            expected[:, t] += weight[:, j] * inputs[:, t + j]
        if bias is not None:
            expected[:, t] += bias
    assert rel_err(y, expected) < TOL
    assert torch.equal(final, inputs[:, inputs.shape[1] - (k - 1) :].transpose(1, 2))

    # Zero initial state is the default.
    y_default, _ = causal_conv1d(x, weight, bias)
    y_zeros, _ = causal_conv1d(x, weight, bias, torch.zeros_like(state0))
    assert rel_err(y_default, y_zeros) < TOL


@pytest.mark.parametrize("k", [1, 4])
def test_causal_conv1d_step_and_halves(k: int) -> None:
    x, weight, bias, state0 = conv_inputs(10 + k, L=9, k=k)
    y_ref, final_ref = causal_conv1d(x, weight, bias, state0)

    state, ys = state0, []
    for t in range(x.shape[1]):
        y_t, state = causal_conv1d_step(state, x[:, t], weight, bias)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=1), y_ref) < TOL and torch.equal(state, final_ref)

    for cut in (1, 2, 5):  # cuts shorter and longer than k-1
        y1, mid = causal_conv1d(x[:, :cut], weight, bias, state0)
        y2, final = causal_conv1d(x[:, cut:], weight, bias, mid)
        assert rel_err(torch.cat([y1, y2], dim=1), y_ref) < TOL and torch.equal(final, final_ref)


def test_causal_conv1d_gradients_match_loop() -> None:
    x, weight, bias, state0 = (t.requires_grad_(True) for t in conv_inputs(30))
    y, final = causal_conv1d(x, weight, bias, state0)
    state, ys = state0, []
    for t in range(x.shape[1]):
        y_t, state = causal_conv1d_step(state, x[:, t], weight, bias)
        ys.append(y_t)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = torch.autograd.grad((y * probe).sum() + final.sum(), (x, weight, bias, state0))
    want = torch.autograd.grad((torch.stack(ys, 1) * probe).sum() + state.sum(), (x, weight, bias, state0))
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL


# ------------------------------------------------------------------------------------------- attention, stage 1


def attention_inputs(seed: int, b: int = 2, L: int = 9, h: int = 4, hk: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, h, d, generator=g, dtype=F64), torch.randn(b, L, hk, d, generator=g, dtype=F64)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    b, L, h, _ = q.shape
    hk = k.shape[2]
    A = torch.zeros(b, h, L, L, dtype=F64)
    for head in range(h):
        kv = head // (h // hk)
        for i in range(L):
            logits = torch.stack([(q[:, i, head] * k[:, j, kv]).sum(-1) for j in range(i + 1)], dim=-1)
            A[:, head, i, : i + 1] = torch.softmax(logits * softmax_scale, dim=-1)
    return A


@pytest.mark.parametrize("h,hk", [(4, 4), (4, 2), (4, 1)])
def test_attention_matrix_matches_explicit_softmax(h: int, hk: int) -> None:
    q, k = attention_inputs(h + hk, h=h, hk=hk)
    A = attention_matrix(q, k, 0.35)
    assert A.dtype == F64
    assert rel_err(A, explicit_attention(q, k, 0.35)) < TOL
    assert rel_err(A.sum(-1), torch.ones(A.shape[:-1], dtype=F64)) < TOL


def test_attention_matrix_float32_for_half_inputs() -> None:
    q, k = attention_inputs(1)
    assert attention_matrix(q.bfloat16(), k.bfloat16(), 0.35).dtype == torch.float32


def test_stage1_loss_matches_explicit_and_has_finite_gradients() -> None:
    b, L, h, hk = 2, 9, 6, 3
    q, k = attention_inputs(40, b=b, L=L, h=h, hk=hk)
    ssd = ssd_inputs(41, b=b, L=L, h=h, gb=2, gc=3)
    log_a, B, C, scale = (ssd[name] for name in ("log_a", "B", "C", "scale"))
    leaves = [t.requires_grad_(True) for t in (q, k, log_a, B, C, scale)]
    loss = stage1_loss(q, k, 0.3, log_a, B, C, scale)

    A = explicit_attention(q.detach(), k.detach(), 0.3)
    M = ssd_matrix(log_a.detach(), B.detach(), C.detach(), scale.detach())
    per_head = [((A[bi, head] - M[bi, head]) ** 2).sum().sqrt() for bi in range(b) for head in range(h)]
    expected = torch.stack(per_head).mean()
    assert abs(loss.item() - expected.item()) / expected.item() < TOL

    grads = torch.autograd.grad(loss, leaves)
    for name, grad in zip(("q", "k", "log_a", "B", "C", "scale"), grads):
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name

    # The gradient is right, not just finite: compare with a central difference along a random direction.
    direction = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
                 for i, t in enumerate(leaves)]
    eps = 1e-6
    with torch.no_grad():
        plus, minus = (_loss_at(leaves, direction, step) for step in (eps, -eps))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((g * v).sum() for g, v in zip(grads, direction))
    assert abs(numeric - analytic) / abs(analytic) < 1e-6


def _loss_at(leaves: list[torch.Tensor], direction: list[torch.Tensor], step: float) -> torch.Tensor:
    q, k, log_a, B, C, scale = (t.detach() + step * v for t, v in zip(leaves, direction))
    return stage1_loss(q, k, 0.3, log_a, B, C, scale)


# ----------------------------------------------------------------------------------------------- validation


def test_shape_errors_name_the_argument() -> None:
    inputs = ssd_inputs(0, L=5, h=4)
    with pytest.raises(ValueError, match="log_a must have shape"):
        ssd_chunked(**{**inputs, "log_a": inputs["log_a"][:, :4]})
    with pytest.raises(ValueError, match="B has 3 groups"):
        ssd_naive(**{**inputs, "B": torch.randn(2, 5, 3, 5, dtype=F64)})
    with pytest.raises(ValueError, match="C must have shape"):
        ssd_materialized(**{**inputs, "C": inputs["C"][..., :2]})
    with pytest.raises(ValueError, match="scale must have shape"):
        ssd_chunked(**{**inputs, "scale": inputs["scale"][..., :2]})
    with pytest.raises(ValueError, match="initial_state must have shape"):
        ssd_chunked(**{**inputs, "initial_state": inputs["initial_state"][:, :, :1]})
    with pytest.raises(ValueError, match="D must have shape"):
        ssd_step(inputs["initial_state"], inputs["x"][:, 0], inputs["log_a"][:, 0], inputs["B"][:, 0],
                 inputs["C"][:, 0], None, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="k has 3 groups"):
        attention_matrix(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8), 1.0)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        causal_conv1d(torch.randn(1, 4, 3), torch.randn(3, 4), None, torch.randn(1, 3, 2))
