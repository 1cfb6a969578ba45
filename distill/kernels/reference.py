"""Reference SSD (state space duality) math in plain PyTorch.

This file is the definition every fast kernel is checked against, and the CPU path of the toolkit. It imports only
torch and the standard library, so it can be copied beside an exported model's modeling code.

Layout everywhere: (batch, length, heads, dim).

    x       (b, L, h, p)      inputs, p channels per head
    log_a   (b, L, h)         per-step log decay, <= 0
    B       (b, L, gb, n)     input projection, gb groups; head i uses group i // (h // gb)
    C       (b, L, gc, n)     output projection, gc groups; head i uses group i // (h // gc)
    scale   (b, L, h) | None  per-step input scale (None means 1)
    D       (h,) | None       skip connection
    state   (b, h, p, n)

Recurrence, per head:

    state_t = exp(log_a_t) * state_{t-1} + scale_t * outer(x_t, B_t)
    y_t     = state_t @ C_t + D * x_t

Equivalently y = M x + D x with the lower-triangular mixing matrix

    M[i, j] = (C_i . B_j) * exp(sum_{k=j+1..i} log_a_k) * scale_j      for i >= j, else 0

plus, given an initial state h0, the term C_i . exp(sum_{k<=i} log_a_k) h0.

Mamba-2 form: dt = softplus(dt_raw + dt_bias), log_a = dt * -exp(A_log), scale = dt.
Discrete (Phi-Mamba) form: log_a = -softplus(a_raw), scale = None.

Half-precision inputs are computed in float32 and the outputs cast back; float32 and float64 are kept as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "segment_sum",
    "ssd_naive",
    "ssd_matrix",
    "ssd_materialized",
    "ssd_chunked",
    "ssd_step",
    "causal_conv1d",
    "causal_conv1d_step",
    "attention_matrix",
    "stage1_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Validation and small helpers


def _check_shape(name: str, tensor: Tensor, expected: tuple[int | str, ...], hint: str) -> None:
    """Raise one ValueError naming `name` when `tensor` does not match `expected` (ints must match exactly)."""
    ok = tensor.dim() == len(expected) and all(
        not isinstance(want, int) or have == want for have, want in zip(tensor.shape, expected)
    )
    if not ok:
        raise ValueError(f"{name} must have shape {hint}, got {tuple(tensor.shape)}")


def _check_groups(name: str, groups: int, heads: int) -> None:
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"{name} has {groups} groups, which must divide the number of heads h={heads}")


def _check_ssd_inputs(
    x: Tensor,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None,
    D: Tensor | None,
    initial_state: Tensor | None,
) -> tuple[int, int, int, int, int, int, int]:
    """Validate the sequence SSD arguments; return (b, L, h, p, n, gb, gc)."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (b, L, h, p), got {tuple(x.shape)}")
    b, L, h, p = x.shape
    _check_shape("log_a", log_a, (b, L, h), f"(b, L, h) = {(b, L, h)}")
    if B.dim() != 4:
        raise ValueError(f"B must have shape (b, L, gb, n) = ({b}, {L}, gb, n), got {tuple(B.shape)}")
    gb, n = B.shape[2], B.shape[3]
    _check_shape("B", B, (b, L, gb, n), f"(b, L, gb, n) = ({b}, {L}, gb, n)")
    _check_shape("C", C, (b, L, "gc", n), f"(b, L, gc, n) = ({b}, {L}, gc, {n})")
    gc = C.shape[2]
    _check_groups("B", gb, h)
    _check_groups("C", gc, h)
    if scale is not None:
        _check_shape("scale", scale, (b, L, h), f"(b, L, h) = {(b, L, h)}")
    if D is not None:
        _check_shape("D", D, (h,), f"(h,) = ({h},)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (b, h, p, n), f"(b, h, p, n) = {(b, h, p, n)}")
    return b, L, h, p, n, gb, gc


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 -> float32 (cumulative sums of log decays need the range); float32/64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


def _expand_groups(t: Tensor, groups: int) -> Tensor:
    """(b, L, g0, n) -> (b, L, groups, n), repeating each of the g0 groups groups // g0 times (no copy if equal)."""
    g0 = t.shape[2]
    return t if g0 == groups else t.repeat_interleave(groups // g0, dim=2)


def segment_sum(log_a: Tensor) -> Tensor:
    """Sums of log decays over every segment: (..., T) -> (..., T, T).

    out[..., i, j] = sum_{k=j+1..i} log_a[..., k] for i >= j (0 on the diagonal), -inf for i < j, so that
    exp(out) is the causal decay matrix. Each entry is a cumulative sum of only the terms of its own segment, not a
    difference of two long prefix sums, so it stays accurate in float32 however long the sequence; the -inf goes in
    before any exp, so nothing overflows and gradients through the masked entries are exactly zero.
    """
    T = log_a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=log_a.device)
    terms = log_a[..., :, None].expand(*log_a.shape, T)  # terms[..., k, j] = log_a[..., k]
    terms = terms.masked_fill(~torch.tril(ones, diagonal=-1), 0.0)  # keep k > j only
    sums = terms.cumsum(dim=-2)  # sums[..., i, j] = sum_{j < k <= i} log_a[..., k]
    return sums.masked_fill(~torch.tril(ones), float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# SSD: the time loop, the materialised matrix, the chunked scan, one step


def ssd_naive(
    x: Tensor,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence as a loop over time: the definition everything else is checked against.

    state_t = exp(log_a_t) * state_{t-1} + scale_t * outer(x_t, B_t);  y_t = state_t @ C_t + D * x_t.
    Returns y (b, L, h, p) and the final state (b, h, p, n).
    """
    b, L, h, p, n, _, _ = _check_ssd_inputs(x, log_a, B, C, scale, D, initial_state)
    dtype = _compute_dtype(x.dtype)
    B_heads = _expand_groups(B.to(dtype), h)
    C_heads = _expand_groups(C.to(dtype), h)
    x_in = x.to(dtype) if scale is None else x.to(dtype) * scale.to(dtype)[..., None]
    state = x.new_zeros(b, h, p, n, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(L):
        decay = log_a[:, t].to(dtype).exp()[..., None, None]
        state = decay * state + x_in[:, t, :, :, None] * B_heads[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C_heads[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=dtype)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x.to(dtype)
    return y.to(x.dtype), state.to(x.dtype)


def _mixing_matrix(log_a: Tensor, B: Tensor, C: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """M (b, h, L, L) and the decay matrix exp(segment_sum) (b, h, L, L), in the compute dtype."""
    b, L, h = log_a.shape
    gb, gc = B.shape[2], C.shape[2]
    dtype = _compute_dtype(log_a.dtype)
    g = math.lcm(gb, gc)  # the coarsest grouping that refines both B's and C's: no repeat up to h heads
    B_g = _expand_groups(B.to(dtype), g)
    C_g = _expand_groups(C.to(dtype), g)
    CB = torch.einsum("bign,bjgn->bgij", C_g, B_g)  # (b, g, L, L)
    decay = segment_sum(log_a.to(dtype).transpose(1, 2)).exp()  # (b, h, L, L)
    M = (CB[:, :, None] * decay.view(b, g, h // g, L, L)).view(b, h, L, L)
    if scale is not None:
        M = M * scale.to(dtype).transpose(1, 2)[:, :, None, :]  # scale_j multiplies column j
    return M, decay


def ssd_matrix(log_a: Tensor, B: Tensor, C: Tensor, scale: Tensor | None = None) -> Tensor:
    """The mixing matrix M (b, h, L, L), lower triangular:

    M[i, j] = (C_i . B_j) * exp(sum_{k=j+1..i} log_a_k) * scale_j for i >= j, else 0.
    log_a (b, L, h); B (b, L, gb, n); C (b, L, gc, n); scale (b, L, h) or None. Half inputs give float32.
    """
    if log_a.dim() != 3:
        raise ValueError(f"log_a must have shape (b, L, h), got {tuple(log_a.shape)}")
    b, L, h = log_a.shape
    _check_shape("B", B, (b, L, "gb", "n"), f"(b, L, gb, n) = ({b}, {L}, gb, n)")
    _check_shape("C", C, (b, L, "gc", B.shape[-1]), f"(b, L, gc, n) = ({b}, {L}, gc, {B.shape[-1]})")
    _check_groups("B", B.shape[2], h)
    _check_groups("C", C.shape[2], h)
    if scale is not None:
        _check_shape("scale", scale, (b, L, h), f"(b, L, h) = {(b, L, h)}")
    return _mixing_matrix(log_a, B, C, scale)[0]


def ssd_materialized(
    x: Tensor,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """y = M x + D x + C_i . exp(sum_{k<=i} log_a_k) h0, with M from `ssd_matrix`; O(L^2) memory.

    Final state = exp(sum_k log_a_k) h0 + sum_j exp(sum_{k>j} log_a_k) scale_j outer(x_j, B_j).
    Returns y (b, L, h, p) and the final state (b, h, p, n).
    """
    b, L, h, p, n, _, _ = _check_ssd_inputs(x, log_a, B, C, scale, D, initial_state)
    dtype = _compute_dtype(x.dtype)
    M, decay = _mixing_matrix(log_a, B, C, scale)
    xd = x.to(dtype)
    y = torch.einsum("bhij,bjhp->bihp", M, xd)

    # The state left after the last step: row L-1 of the decay matrix weighs each input.
    x_in = xd if scale is None else xd * scale.to(dtype)[..., None]
    to_end = decay[:, :, -1, :] if L > 0 else decay.new_zeros(b, h, 0)  # (b, h, L)
    final = torch.einsum("bhj,bjhp,bjhn->bhpn", to_end, x_in, _expand_groups(B.to(dtype), h))

    if initial_state is not None:
        h0 = initial_state.to(dtype)
        from_start = log_a.to(dtype).cumsum(dim=1).exp()  # (b, L, h): decay of h0 up to and including step i
        C_heads = _expand_groups(C.to(dtype), h)
        y = y + torch.einsum("bihn,bhpn->bihp", C_heads, h0) * from_start[..., None]
        total = from_start[:, -1] if L > 0 else from_start.new_ones(b, h)
        final = final + total[..., None, None] * h0
    if D is not None:
        y = y + D.to(dtype)[:, None] * xd
    return y.to(x.dtype), final.to(x.dtype)


def ssd_chunked(
    x: Tensor,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The chunked SSD scan: O(L * chunk_size) work and memory, no loop over time. Same results as `ssd_naive`.

    The sequence is cut into chunks of T = chunk_size steps (the tail padded with log_a = 0, x = 0, which leaves
    outputs and state unchanged, and cut off again). Then, per chunk:
      1. within the chunk, y = M_chunk x (the quadratic form, T x T);
      2. the state the chunk leaves behind when started from zero;
      3. the states entering each chunk, passed across chunks by the same decay matrix one level up
         (a segment sum over chunk totals, not a Python loop);
      4. each chunk's output due to its entering state: C_i . exp(sum_{chunk start..i} log_a) state_in.
    Returns y (b, L, h, p) and the final state (b, h, p, n).
    """
    b, L, h, p, n, gb, gc = _check_ssd_inputs(x, log_a, B, C, scale, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    dtype = _compute_dtype(x.dtype)
    T = chunk_size
    g = math.lcm(gb, gc)  # B and C are expanded to g groups (often just max(gb, gc)), never to h heads
    r = h // g  # heads per group

    x_orig = x.to(dtype)
    x_in = x_orig if scale is None else x_orig * scale.to(dtype)[..., None]  # fold scale_j into x_j
    B_g = _expand_groups(B.to(dtype), g)
    C_g = _expand_groups(C.to(dtype), g)
    log_a = log_a.to(dtype)

    pad = (-L) % T
    if pad:
        x_in = F.pad(x_in, (0, 0, 0, 0, 0, pad))
        B_g = F.pad(B_g, (0, 0, 0, 0, 0, pad))
        C_g = F.pad(C_g, (0, 0, 0, 0, 0, pad))
        log_a = F.pad(log_a, (0, 0, 0, pad))
    nc = (L + pad) // T

    x_c = x_in.view(b, nc, T, g, r, p)
    B_c = B_g.view(b, nc, T, g, n)
    C_c = C_g.view(b, nc, T, g, n)
    log_a_c = log_a.view(b, nc, T, h).transpose(2, 3)  # (b, c, h, T): time last for the segment sums

    # 1. Within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(sum_{s<k<=l} log_a_k) x_s.
    decay = segment_sum(log_a_c).exp().view(b, nc, g, r, T, T)  # (b, c, g, r, l, s)
    CB = torch.einsum("bclgn,bcsgn->bcgls", C_c, B_c)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", CB[:, :, :, None] * decay, x_c)

    # 2. The state each chunk leaves behind from a zero start: the last row of its decay matrix weighs its inputs.
    to_end = decay[..., -1, :].permute(0, 1, 4, 2, 3)  # (b, c, s, g, r)
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", B_c, x_c * to_end[..., None]).reshape(b, nc, h, p, n)

    # 3. States entering each chunk. Treat h0 as the output of a chunk "-1"; then
    #    state_after[z] = sum_{c<=z} exp(sum of chunk totals c+1..z) chunk_state[c].
    h0 = x_in.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(dtype)
    states = torch.cat([h0[:, None], chunk_states], dim=1)  # (b, nc + 1, h, p, n)
    from_start = log_a_c.cumsum(dim=-1)  # (b, c, h, T)
    chunk_totals = F.pad(from_start[..., -1].transpose(1, 2), (1, 0))  # (b, h, nc + 1), 0 for chunk "-1"
    across = segment_sum(chunk_totals).exp()  # (b, h, z, c)
    states_after = torch.einsum("bhzc,bchpn->bzhpn", across, states)
    entering, final = states_after[:, :-1], states_after[:, -1]

    # 4. Output due to the entering state, decayed from the chunk start to each step.
    from_start = from_start.exp().view(b, nc, g, r, T).permute(0, 1, 4, 2, 3)  # (b, c, l, g, r)
    y_state = torch.einsum("bclgn,bcgrpn->bclgrp", C_c, entering.reshape(b, nc, g, r, p, n))
    y = y + y_state * from_start[..., None]

    y = y.reshape(b, nc * T, h, p)[:, :L]
    if D is not None:
        y = y + D.to(dtype)[:, None] * x_orig
    return y.to(x.dtype), final.to(x.dtype)


def ssd_step(
    state: Tensor,
    x: Tensor,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
    D: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the recurrence (decoding).

    state (b, h, p, n); x (b, h, p); log_a (b, h); B (b, gb, n); C (b, gc, n); scale (b, h) | None; D (h,) | None.
    new_state = exp(log_a) * state + scale * outer(x, B);  y = new_state @ C + D * x.
    Returns y (b, h, p) and new_state (b, h, p, n).
    """
    if state.dim() != 4:
        raise ValueError(f"state must have shape (b, h, p, n), got {tuple(state.shape)}")
    b, h, p, n = state.shape
    _check_shape("x", x, (b, h, p), f"(b, h, p) = {(b, h, p)}")
    _check_shape("log_a", log_a, (b, h), f"(b, h) = {(b, h)}")
    _check_shape("B", B, (b, "gb", n), f"(b, gb, n) = ({b}, gb, {n})")
    _check_shape("C", C, (b, "gc", n), f"(b, gc, n) = ({b}, gc, {n})")
    _check_groups("B", B.shape[1], h)
    _check_groups("C", C.shape[1], h)
    if scale is not None:
        _check_shape("scale", scale, (b, h), f"(b, h) = {(b, h)}")
    if D is not None:
        _check_shape("D", D, (h,), f"(h,) = ({h},)")
    dtype = _compute_dtype(state.dtype)
    xd = x.to(dtype)
    x_in = xd if scale is None else xd * scale.to(dtype)[..., None]
    B_heads = B.to(dtype).repeat_interleave(h // B.shape[1], dim=1)
    C_heads = C.to(dtype).repeat_interleave(h // C.shape[1], dim=1)
    new_state = log_a.to(dtype).exp()[..., None, None] * state.to(dtype) + x_in[..., None] * B_heads[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C_heads)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xd
    return y.to(x.dtype), new_state.to(state.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Depthwise causal convolution (the short conv in front of the SSD)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution, no activation.

    x (b, L, c); weight (c, k); bias (c,) | None; initial_state (b, c, k-1) | None: the k-1 inputs before x
    (None means zeros). y_t[c] = bias[c] + sum_{j<k} weight[c, j] * u_{t-k+1+j}[c], where u is the inputs preceded
    by the initial state, so weight[:, -1] multiplies the current input (the nn.Conv1d(padding=k-1) convention).
    Returns y (b, L, c) and the final state (b, c, k-1): the last k-1 inputs, ready for the next call or a step.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (b, L, c), got {tuple(x.shape)}")
    b, L, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (c, k) = ({c}, k) with k >= 1, got {tuple(weight.shape)}")
    k = weight.shape[1]
    if bias is not None:
        _check_shape("bias", bias, (c,), f"(c,) = ({c},)")
    if initial_state is None:
        initial_state = x.new_zeros(b, c, k - 1)
    _check_shape("initial_state", initial_state, (b, c, k - 1), f"(b, c, k-1) = {(b, c, k - 1)}")
    u = torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=2)  # (b, c, k-1+L)
    y = F.conv1d(u, weight[:, None, :].to(x.dtype), bias, groups=c)  # (b, c, L)
    final_state = u[:, :, u.shape[2] - (k - 1) :]
    return y.transpose(1, 2), final_state


def causal_conv1d_step(
    conv_state: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of `causal_conv1d`: conv_state (b, c, k-1), x (b, c) -> y (b, c), new_state (b, c, k-1)."""
    if x.dim() != 2:
        raise ValueError(f"x must have shape (b, c), got {tuple(x.shape)}")
    b, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (c, k) = ({c}, k) with k >= 1, got {tuple(weight.shape)}")
    k = weight.shape[1]
    _check_shape("conv_state", conv_state, (b, c, k - 1), f"(b, c, k-1) = {(b, c, k - 1)}")
    if bias is not None:
        _check_shape("bias", bias, (c,), f"(c,) = ({c},)")
    window = torch.cat([conv_state.to(x.dtype), x[:, :, None]], dim=2)  # (b, c, k), oldest first
    y = (window * weight.to(x.dtype)).sum(dim=-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, window[:, :, 1:]


# ----------------------------------------------------------------------------------------------------------------
# Attention matrix and the MOHAWK stage-1 loss


def attention_matrix(q: Tensor, k: Tensor, softmax_scale: float) -> Tensor:
    """A = softmax(q k^T * softmax_scale + causal mask), computed in float32 (float64 kept): (b, h, L, L).

    q (b, L, h, d); k (b, L, hk, d) with h % hk == 0: query head i reads key head i // (h // hk) (GQA).
    """
    if q.dim() != 4:
        raise ValueError(f"q must have shape (b, L, h, d), got {tuple(q.shape)}")
    b, L, h, d = q.shape
    _check_shape("k", k, (b, L, "hk", d), f"(b, L, hk, d) = ({b}, {L}, hk, {d})")
    hk = k.shape[2]
    _check_groups("k", hk, h)
    dtype = _compute_dtype(q.dtype)
    # Group the query heads by their key head, so k is never repeated.
    scores = torch.einsum("bigrd,bjgd->bgrij", q.to(dtype).view(b, L, hk, h // hk, d), k.to(dtype))
    scores = scores.reshape(b, h, L, L) * softmax_scale
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def stage1_loss(
    q: Tensor,
    k: Tensor,
    softmax_scale: float,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
) -> Tensor:
    """MOHAWK stage 1 (matrix orientation): mean over batch and heads of || A - M ||_F.

    A = attention_matrix(q, k, softmax_scale), M = ssd_matrix(log_a, B, C, scale), both (b, h, L, L).
    """
    if q.dim() != 4:
        raise ValueError(f"q must have shape (b, L, h, d), got {tuple(q.shape)}")
    b, L, h, _ = q.shape
    _check_shape("log_a", log_a, (b, L, h), f"(b, L, h) = {(b, L, h)} to match q")
    A = attention_matrix(q, k, softmax_scale)
    M = ssd_matrix(log_a, B, C, scale)
    dtype = torch.promote_types(A.dtype, M.dtype)
    return torch.linalg.matrix_norm(A.to(dtype) - M.to(dtype), ord="fro").mean()


# ----------------------------------------------------------------------------------------------------------------
# The block's other pieces: the Llama family's RMSNorm and SwiGLU gate (the student keeps the teacher's)


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """weight * normalize(x), exactly as the Llama family's RMSNorm computes it.

    x (..., d); weight (d,). The mean square is taken in float32 and the normalized x rounded back to x's dtype
    before the product with the weight, so the output has the dtype of `weight * x` (float32 for a float32 stream,
    bfloat16 for a bfloat16 teacher). float64 is kept as it is. `out_dtype`: the product rounded to it instead (what
    a consumer under autocast would round it to anyway).
    """
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"weight must have shape (d,) = ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    h = x.to(_compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the gated MLP's inner activation (Llama, Qwen2), in the inputs' dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------------
# Stage 3's divergence on a chunk of logits, with its gradient

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(log_p_s: Tensor, log_p_t: Tensor, divergence: str, beta: float = 0.5) -> Tensor:
    """Each row's divergence (...,) from student and teacher log-probabilities (..., V).

    forward_kl KL(p_t || p_s); reverse_kl KL(p_s || p_t); jsd beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
    m = beta p_t + (1 - beta) p_s.
    """
    if divergence == "forward_kl":
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if divergence == "reverse_kl":
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    if divergence == "jsd":
        # log m by logsumexp of the weighted log-probabilities: stable where either distribution underflows.
        log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log(1 - beta))
        kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
        kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    raise ValueError(f"divergence {divergence!r} is not one of {DIVERGENCES}")


def chunk_sums(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, divergence: str,
               beta: float, temperature: float, weights: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(sum over rows of the divergence at `temperature`, each row times its entry of `weights` (n,) where given,
    sum over rows of the (T = 1) cross-entropy on `labels`, or None without labels), logits (n, V) in the dtype to
    compute in."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    rows = token_divergence(log_p_s, log_p_t, divergence, beta)
    div = (rows * weights.to(rows.dtype) if weights is not None else rows).sum()
    ce = F.cross_entropy(student_logits, labels, reduction="sum") if labels is not None else None
    return div, ce


def chunk_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kl_scale: float = 1.0,
    labels: Tensor | None = None,
    ce_scale: float = 0.0,
    grad_dtype: torch.dtype | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One chunk of stage 3: logits (n, V) of student and teacher, softmaxes at `temperature`.

    Returns the sum over rows of the divergence (each row times its entry of `weights` (n,) where given), the sum
    over rows of the student's (T = 1) cross-entropy on `labels` (n,) (ignore index -100; None without labels), and
    the gradient of kl_scale * divergence sum + ce_scale * cross-entropy sum with respect to the student logits, in
    `grad_dtype` (default: the logits' dtype). Half-precision logits are computed in float32.
    """
    dtype = _compute_dtype(student_logits.dtype)
    with torch.enable_grad():
        s = student_logits.detach().to(dtype).requires_grad_(True)
        t = teacher_logits.detach().to(dtype)
        div, ce = chunk_sums(s, t, labels, divergence, beta, temperature, weights)
        total = div * kl_scale + (ce * ce_scale if ce is not None else 0.0)
        (grad,) = torch.autograd.grad(total, s)
    return div.detach(), (ce.detach() if ce is not None else None), grad.to(grad_dtype or student_logits.dtype)
