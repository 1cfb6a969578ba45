"""Fused Triton kernels for the chunked SSD scan: one main launch forward, one backward.

Same signature and semantics as `reference.ssd_chunked` (see reference.py for the recurrence and the shapes):

    y, final_state = ssd_chunked_triton(x, log_a, B, C, scale=None, D=None, initial_state=None, chunk_size=64)

Design. One program owns one (batch, head, block of p) and walks the chunks of its sequence in order, carrying the
(p, n) state in registers, so nothing but the inputs and outputs (and, for training, the state entering each chunk)
touches device memory. Per chunk of T steps, with cs the cumulative sum of log_a inside the chunk:

    y     = [(C B^T) * exp(cs_i - cs_j) * scale_j]_{i>=j} x  +  exp(cs) * (C S^T)  +  D x     (S: entering state)
    S_new = exp(cs_T) S + (x * exp(cs_T - cs) * scale)^T B

The backward kernel walks the chunks in reverse, carrying dS = dLoss/dS the same way (the recurrence run backwards,
dy in place of x and C in place of B), and reads the entering states the forward stored. The gradient of log_a needs
no pass of its own: log_a_k enters every pair term (output i, input j) with j < k <= i as exp(... + log_a_k + ...),
so dlog_a_k is the sum of those terms, which splits into four chunk-local pieces (see the backward kernel). No
prefix sum runs over the sequence, so nothing large cancels and segments need no carry between them.

When batch x heads x p blocks is too small to fill the GPU (long sequences, few heads), the chunks are cut into
segments run in parallel; a light kernel first computes each segment's own end state (or, backward, start-state
gradient) from zero, and each main program starts from the earlier (later) segments' contributions combined.

Matrix products run on the tensor cores in the input dtype with float32 accumulation (float64 for float64 inputs);
decays and the carried state stay in float32.

Only relative imports here: this file is copied beside an exported model's code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ssd_chunked_triton"]


# ----------------------------------------------------------------------------------------------------------------
# Kernels


# Lengths and head counts vary from call to call: no recompilation for each (strides and p, n stay specialised).
_VARYING = ["seqlen", "nheads", "heads_per_b", "heads_per_c", "chunks_per_seg", "nseg"]


@triton.jit(do_not_specialize=_VARYING)
def _segment_state_kernel(
    u_ptr, log_a_ptr, k_ptr, scale_ptr,  # inputs: u = x (forward) or dy (backward); k = B or C
    seg_state_ptr, seg_decay_ptr,  # outputs: (b, h, nseg, p, n) and (b, h, nseg)
    seqlen, nheads, heads_per_k, dim_p, dim_n, chunks_per_seg, nseg, seg_offset,
    su_b, su_l, su_h,
    sla_b, sla_l, sla_h,
    sk_b, sk_l, sk_g,
    ss_b, ss_l, ss_h,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    REVERSE: tl.constexpr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The state one segment of chunks leaves behind from a zero start, and the segment's total log decay.

    Forward (REVERSE=False): S <- exp(cs_T) S + (x * scale * exp(cs_T - cs))^T B, over the chunks in order.
    Backward (REVERSE=True): dS <- exp(cs_T) dS + (dy * exp(cs))^T C, over the chunks in reverse.
    """
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    seg = tl.program_id(2) + seg_offset
    bi = (pid_bh // nheads).to(tl.int64)
    hi = pid_bh % nheads
    u_ptr += bi * su_b + hi * su_h
    log_a_ptr += bi * sla_b + hi * sla_h
    k_ptr += bi * sk_b + (hi // heads_per_k) * sk_g
    if HAS_SCALE:
        scale_ptr += bi * ss_b + hi * ss_h
    dtype = k_ptr.dtype.element_ty

    offs_t = tl.arange(0, T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < dim_p
    mask_n = offs_n < dim_n

    state = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    total = tl.zeros((T,), dtype=ACC)
    c_begin = seg * chunks_per_seg
    c_count = tl.minimum(chunks_per_seg, tl.cdiv(seqlen, T) - c_begin)
    for i in range(c_count):
        if REVERSE:
            c = c_begin + c_count - 1 - i
        else:
            c = c_begin + i
        t = c * T + offs_t
        mask_t = t < seqlen
        log_a = tl.load(log_a_ptr + t * sla_l, mask=mask_t, other=0.0).to(ACC)
        cs = tl.cumsum(log_a, 0)
        cs_last = tl.sum(log_a, 0)
        total += log_a
        u = tl.load(u_ptr + t[:, None] * su_l + offs_p[None, :], mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        k = tl.load(k_ptr + t[:, None] * sk_l + offs_n[None, :], mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        if REVERSE:
            weight = tl.exp(cs)
        else:
            weight = tl.exp(cs_last - cs)
            if HAS_SCALE:
                weight *= tl.load(scale_ptr + t * ss_l, mask=mask_t, other=0.0).to(ACC)
        u_in = (u.to(ACC) * weight[:, None]).to(dtype)
        state = state * tl.exp(cs_last) + tl.dot(tl.trans(u_in), k, input_precision=DOT_PRECISION, out_dtype=ACC)

    head_seg = (bi * nheads + hi) * nseg + seg
    tl.store(
        seg_state_ptr + head_seg * dim_p * dim_n + offs_p[:, None] * dim_n + offs_n[None, :], state,
        mask=mask_p[:, None] & mask_n[None, :],
    )
    tl.store(seg_decay_ptr + head_seg, tl.sum(total, 0))


@triton.jit(do_not_specialize=_VARYING)
def _ssd_fwd_kernel(
    x_ptr, log_a_ptr, b_ptr, c_ptr, scale_ptr, d_ptr, h0_ptr, seg_state_ptr, seg_decay_ptr,  # inputs
    y_ptr, final_ptr, states_ptr,  # outputs
    seqlen, nheads, heads_per_b, heads_per_c, dim_p, dim_n, chunks_per_seg, nseg,
    sx_b, sx_l, sx_h,
    sla_b, sla_l, sla_h,
    sb_b, sb_l, sb_g,
    sc_b, sc_l, sc_g,
    ss_b, ss_l, ss_h,
    sh0_b, sh0_h, sh0_p,
    sy_b, sy_l, sy_h,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_D: tl.constexpr, HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    seg = tl.program_id(2)
    bi = (pid_bh // nheads).to(tl.int64)
    hi = pid_bh % nheads
    x_ptr += bi * sx_b + hi * sx_h
    y_ptr += bi * sy_b + hi * sy_h
    log_a_ptr += bi * sla_b + hi * sla_h
    b_ptr += bi * sb_b + (hi // heads_per_b) * sb_g
    c_ptr += bi * sc_b + (hi // heads_per_c) * sc_g
    if HAS_SCALE:
        scale_ptr += bi * ss_b + hi * ss_h
    dtype = x_ptr.dtype.element_ty

    offs_t = tl.arange(0, T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < dim_p
    mask_n = offs_n < dim_n
    mask_pn = mask_p[:, None] & mask_n[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    state_offs = offs_p[:, None] * dim_n + offs_n[None, :]  # into a contiguous (p, n) state

    if HAS_H0:
        h0 = h0_ptr + bi * sh0_b + hi * sh0_h + offs_p[:, None] * sh0_p + offs_n[None, :]
        state = tl.load(h0, mask=mask_pn, other=0.0).to(ACC)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    # The state entering this segment: the earlier segments' states (each from a zero start), passed along.
    head = bi * nheads + hi
    for r in range(seg):
        decay_r = tl.load(seg_decay_ptr + head * nseg + r)
        seg_r = tl.load(seg_state_ptr + (head * nseg + r) * dim_p * dim_n + state_offs, mask=mask_pn, other=0.0)
        state = state * tl.exp(decay_r) + seg_r
    if HAS_D:
        d = tl.load(d_ptr + hi).to(ACC)

    nchunks = tl.cdiv(seqlen, T)
    if STORE_STATES:
        states_ptr += head * nchunks * dim_p * dim_n
    c_begin = seg * chunks_per_seg
    for c in range(c_begin, tl.minimum(c_begin + chunks_per_seg, nchunks)):
        t = c * T + offs_t
        mask_t = t < seqlen
        # Steps past the end load log_a = 0, x = 0: they leave the state as it is.
        log_a = tl.load(log_a_ptr + t * sla_l, mask=mask_t, other=0.0).to(ACC)
        cs = tl.cumsum(log_a, 0)
        cs_last = tl.sum(log_a, 0)
        if STORE_STATES:
            tl.store(states_ptr + c * dim_p * dim_n + state_offs, state, mask=mask_pn)
        x = tl.load(x_ptr + t[:, None] * sx_l + offs_p[None, :], mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        Bc = tl.load(b_ptr + t[:, None] * sb_l + offs_n[None, :], mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        Cc = tl.load(c_ptr + t[:, None] * sc_l + offs_n[None, :], mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        to_end = tl.exp(cs_last - cs)  # decay from step j to the chunk's end
        if HAS_SCALE:
            s = tl.load(scale_ptr + t * ss_l, mask=mask_t, other=0.0).to(ACC)
            to_end = to_end * s

        # Within the chunk: the masked, decayed C B^T times x (exp only where i >= j: no overflow above).
        cb = tl.dot(Cc, tl.trans(Bc), input_precision=DOT_PRECISION, out_dtype=ACC)
        decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
        mix = cb * decay
        if HAS_SCALE:
            mix = mix * s[None, :]
        y = tl.dot(mix.to(dtype), x, input_precision=DOT_PRECISION, out_dtype=ACC)
        # The entering state, decayed from the chunk start to each step.
        y_state = tl.dot(Cc, tl.trans(state.to(dtype)), input_precision=DOT_PRECISION, out_dtype=ACC)
        y += tl.exp(cs)[:, None] * y_state
        if HAS_D:
            y += d * x.to(ACC)
        tl.store(
            y_ptr + t[:, None] * sy_l + offs_p[None, :], y.to(y_ptr.dtype.element_ty),
            mask=mask_t[:, None] & mask_p[None, :],
        )

        x_in = (x.to(ACC) * to_end[:, None]).to(dtype)
        state = state * tl.exp(cs_last) + tl.dot(tl.trans(x_in), Bc, input_precision=DOT_PRECISION, out_dtype=ACC)

    if seg == nseg - 1:
        tl.store(final_ptr + head * dim_p * dim_n + state_offs, state.to(final_ptr.dtype.element_ty), mask=mask_pn)


@triton.jit(do_not_specialize=_VARYING)
def _ssd_bwd_kernel(
    x_ptr, log_a_ptr, b_ptr, c_ptr, scale_ptr, d_ptr, states_ptr, dy_ptr, dfinal_ptr,  # inputs
    seg_dstate_ptr, seg_decay_ptr,
    dx_ptr, db_ptr, dc_ptr, dlog_a_ptr, dscale_ptr, dd_ptr, dh0_ptr,  # outputs
    seqlen, nheads, heads_per_b, heads_per_c, dim_p, dim_n, chunks_per_seg, nseg,
    sx_b, sx_l, sx_h,
    sla_b, sla_l, sla_h,
    sb_b, sb_l, sb_g,
    sc_b, sc_l, sc_g,
    ss_b, ss_l, ss_h,
    sdy_b, sdy_l, sdy_h,
    sdx_b, sdx_l, sdx_h,
    sdb_split, sdb_b, sdb_l, sdb_h,  # dB / dC per head (and per p block): contiguous (splits, b, L, h, n)
    sdl_split,  # dlog_a / dscale partials: contiguous (splits, b, L, h)
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_D: tl.constexpr, HAS_DFINAL: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    seg = tl.program_id(2)
    bi = (pid_bh // nheads).to(tl.int64)
    hi = pid_bh % nheads
    x_ptr += bi * sx_b + hi * sx_h
    dx_ptr += bi * sdx_b + hi * sdx_h
    dy_ptr += bi * sdy_b + hi * sdy_h
    log_a_ptr += bi * sla_b + hi * sla_h
    b_ptr += bi * sb_b + (hi // heads_per_b) * sb_g
    c_ptr += bi * sc_b + (hi // heads_per_c) * sc_g
    db_ptr += pid_p * sdb_split + bi * sdb_b + hi * sdb_h
    dc_ptr += pid_p * sdb_split + bi * sdb_b + hi * sdb_h
    row = pid_p * sdl_split + (bi * seqlen) * nheads + hi  # (split, b, 0, h) in the (splits, b, L, h) partials
    dlog_a_ptr += row
    if HAS_SCALE:
        scale_ptr += bi * ss_b + hi * ss_h
        dscale_ptr += row
    dtype = x_ptr.dtype.element_ty

    offs_t = tl.arange(0, T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < dim_p
    mask_n = offs_n < dim_n
    mask_pn = mask_p[:, None] & mask_n[None, :]
    causal = offs_t[:, None] >= offs_t[None, :]
    strictly_causal = offs_t[:, None] > offs_t[None, :]
    state_offs = offs_p[:, None] * dim_n + offs_n[None, :]

    head = bi * nheads + hi
    if HAS_DFINAL:
        dstate = tl.load(dfinal_ptr + head * dim_p * dim_n + state_offs, mask=mask_pn, other=0.0).to(ACC)
    else:
        dstate = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    # The state gradient entering this segment from the right: later segments' (from zero), passed back.
    for i in range(nseg - 1 - seg):
        r = nseg - 1 - i
        decay_r = tl.load(seg_decay_ptr + head * nseg + r)
        seg_r = tl.load(seg_dstate_ptr + (head * nseg + r) * dim_p * dim_n + state_offs, mask=mask_pn, other=0.0)
        dstate = dstate * tl.exp(decay_r) + seg_r
    if HAS_D:
        d = tl.load(d_ptr + hi).to(ACC)
    dd_acc = tl.zeros((BLOCK_P,), dtype=ACC)

    nchunks = tl.cdiv(seqlen, T)
    states_ptr += head * nchunks * dim_p * dim_n
    c_begin = seg * chunks_per_seg
    c_count = tl.minimum(chunks_per_seg, nchunks - c_begin)
    for i in range(c_count):
        c = c_begin + c_count - 1 - i
        t = c * T + offs_t
        mask_t = t < seqlen
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        log_a = tl.load(log_a_ptr + t * sla_l, mask=mask_t, other=0.0).to(ACC)
        cs = tl.cumsum(log_a, 0)
        cs_last = tl.sum(log_a, 0)
        x = tl.load(x_ptr + t[:, None] * sx_l + offs_p[None, :], mask=mask_tp, other=0.0)
        dy = tl.load(dy_ptr + t[:, None] * sdy_l + offs_p[None, :], mask=mask_tp, other=0.0).to(dtype)
        Bc = tl.load(b_ptr + t[:, None] * sb_l + offs_n[None, :], mask=mask_tn, other=0.0)
        Cc = tl.load(c_ptr + t[:, None] * sc_l + offs_n[None, :], mask=mask_tn, other=0.0)
        state = tl.load(states_ptr + c * dim_p * dim_n + state_offs, mask=mask_pn, other=0.0)  # entering, float32
        state_lo = state.to(dtype)
        from_start = tl.exp(cs)  # decay of the entering state to step i
        to_end = tl.exp(cs_last - cs)  # decay of step j's input to the chunk's end
        if HAS_SCALE:
            s = tl.load(scale_ptr + t * ss_l, mask=mask_t, other=0.0).to(ACC)
        else:
            s = tl.full((T,), 1.0, dtype=ACC)

        cb = tl.dot(Cc, tl.trans(Bc), input_precision=DOT_PRECISION, out_dtype=ACC)
        decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
        mix = cb * decay  # M without the scale

        # dxs: the gradient of the scaled input scale_j x_j (within the chunk, then through the chunk's end state).
        dxs = tl.dot(tl.trans(mix.to(dtype)), dy, input_precision=DOT_PRECISION, out_dtype=ACC)
        dxs_state = tl.dot(Bc, tl.trans(dstate.to(dtype)), input_precision=DOT_PRECISION, out_dtype=ACC)
        dxs += to_end[:, None] * dxs_state
        dx = dxs * s[:, None]
        if HAS_D:
            dx += d * dy.to(ACC)
            dd_acc += tl.sum(dy.to(ACC) * x.to(ACC), 0)
        tl.store(dx_ptr + t[:, None] * sdx_l + offs_p[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_tp)
        if HAS_SCALE:
            tl.store(dscale_ptr + t * nheads, tl.sum(x.to(ACC) * dxs, 1), mask=mask_t)

        # g_ij = d loss / d(C_i . B_j) within the chunk; g_ij (C_i . B_j) = the pair's term dy_i . M_ij x_j.
        dyx = tl.dot(dy, tl.trans(x), input_precision=DOT_PRECISION, out_dtype=ACC)
        g = dyx * decay * s[None, :]
        pair = tl.where(strictly_causal, g * cb, 0.0)
        y_state = tl.dot(Cc, tl.trans(state_lo), input_precision=DOT_PRECISION, out_dtype=ACC)

        # dlog_a_k sums the pair terms (output i, input j) with j < k <= i, read off the chunk alone (no long
        # prefix sums, no cancellation): pairs inside the chunk; outputs from k on reading the entering state;
        # inputs before k reaching the chunk's end state; and the entering state carried through the whole chunk.
        # Pairs inside the chunk with j < k <= i: all pairs of outputs i >= k, less those whose input j >= k too
        # (pairs are strictly causal, so j >= k implies i >= k): a suffix sum of (row sum - column sum), O(T).
        rows_minus_cols = tl.sum(pair, 1) - tl.sum(pair, 0)
        inside = tl.sum(rows_minus_cols, 0) - tl.cumsum(rows_minus_cols, 0) + rows_minus_cols
        reads_state = from_start * tl.sum(dy.to(ACC) * y_state, 1)  # output i's use of the entering state
        reaches_end = s * to_end * tl.sum(x.to(ACC) * dxs_state, 1)  # input j's share of the end state
        through = tl.exp(cs_last) * tl.sum(tl.sum(dstate * state, 1), 0)
        reads_total = tl.sum(reads_state, 0)
        dlog_a = (
            through + inside + (reads_total - tl.cumsum(reads_state, 0) + reads_state)
            + (tl.cumsum(reaches_end, 0) - reaches_end)
        )
        tl.store(dlog_a_ptr + t * nheads, dlog_a, mask=mask_t)

        # dC_i = sum_j g_ij B_j + from_start_i S dy_i ; dB_j = sum_i g_ij C_i + to_end_j s_j dS^T x_j.
        g_lo = g.to(dtype)
        dC = tl.dot(g_lo, Bc, input_precision=DOT_PRECISION, out_dtype=ACC)
        dC += from_start[:, None] * tl.dot(dy, state_lo, input_precision=DOT_PRECISION, out_dtype=ACC)
        dB = tl.dot(tl.trans(g_lo), Cc, input_precision=DOT_PRECISION, out_dtype=ACC)
        dB += (to_end * s)[:, None] * tl.dot(x, dstate.to(dtype), input_precision=DOT_PRECISION, out_dtype=ACC)
        tl.store(dc_ptr + t[:, None] * sdb_l + offs_n[None, :], dC.to(dc_ptr.dtype.element_ty), mask=mask_tn)
        tl.store(db_ptr + t[:, None] * sdb_l + offs_n[None, :], dB.to(db_ptr.dtype.element_ty), mask=mask_tn)

        # The state gradient flows to the previous chunk: decayed through the chunk, plus what C read of S.
        dy_in = (dy.to(ACC) * from_start[:, None]).to(dtype)
        dstate = dstate * tl.exp(cs_last) + tl.dot(tl.trans(dy_in), Cc, input_precision=DOT_PRECISION, out_dtype=ACC)

    if seg == 0:
        tl.store(dh0_ptr + head * dim_p * dim_n + state_offs, dstate, mask=mask_pn)
    if HAS_D:
        tl.store(dd_ptr + (head * nseg + seg) * dim_p + offs_p, dd_acc, mask=mask_p)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _pow2_at_least_16(value: int) -> int:
    return max(16, triton.next_power_of_2(value))


def _chunk_block(chunk_size: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The chunk length the kernels use: a power of two in [16, 128] near chunk_size, at most 64 for float32 and
    float64 inputs.

    The result does not depend on the chunk length (only rounding does), so chunk_size is a tuning hint here;
    tl.dot needs every dimension >= 16 and a power of two. Float32 inputs take exact (IEEE) products, which Triton
    builds from scalar FMAs rather than tensor-core instructions: at 128 the backward's tiles do not fit the
    registers, and on an H200 its compile had not finished after 150 s (the forward alone took 29 s; at 64 and below,
    seconds; half precision at 128, 1.2 s). So float32 runs at 64 whatever chunk_size asks.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    widest = 64 if dtype in (torch.float32, torch.float64) else 128
    return min(widest, _pow2_at_least_16(chunk_size))


def _segments(programs: int, nchunks: int, device: torch.device, enough: float) -> int:
    """How many segments to cut the chunks into so that `programs` x segments fills the GPU.

    A program walks its chunks in sequence, so a grid much smaller than the SM count leaves the GPU mostly idle on
    long sequences. Segments run in parallel; a light kernel first computes each segment's own end state (backward:
    start-state gradient) from zero, and each main program starts from the other segments' contributions. That
    costs a pass over x and B (dy and C) and did not pay where programs >= enough x SMs (H100 sweep, bench/).
    """
    sms = _num_sms(device)
    if programs >= enough * sms:
        return 1
    segments = triton.next_power_of_2(triton.cdiv(2 * sms, programs))
    return max(1, min(segments, nchunks // 4))  # keep segments at least 4 chunks long


def _fwd_config(batch_heads: int, dim_p: int, nchunks: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_P, segments, num_warps, num_stages) of the forward kernel.

    Measured on an H100 (bf16, p = n = 64, bench/kernels.py --full-sweep): BLOCK_P 32 with 4 warps and 2 stages was
    fastest where the grid fills the GPU (smaller p blocks re-form C B^T once per block); 8 segments for
    (b, h) = (1, 32) at L = 8192 and 32768 (0.44 -> 0.19 ms, 1.76 -> 0.64 ms).
    """
    block = min(32, _pow2_at_least_16(dim_p))
    return block, _segments(batch_heads * triton.cdiv(dim_p, block), nchunks, device, enough=1.0), 4, 2


def _bwd_config(batch_heads: int, dim_p: int, nchunks: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_P, segments, num_warps, num_stages) of the backward kernel.

    Splitting p in the backward makes dB, dC, dlog_a partial sums (a float32 (b, L, h, n) buffer per block), so
    the backward keeps p whole (up to 64, for registers) and gets its parallelism from segments: none at
    (b, h) = (4, 32) or (8, 9), 16 at (1, 32) (2.79 -> 1.52 ms at L = 8192, 10.7 -> 3.39 ms at 32768, fwd+bwd).
    """
    block = min(64, _pow2_at_least_16(dim_p))
    return block, _segments(batch_heads * triton.cdiv(dim_p, block), nchunks, device, enough=0.5), 4, 1


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products (tf32 would cost ~3e-4 relative error); half inputs ignore this.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _segment_states(
    u: Tensor, log_a: Tensor, k: Tensor, scale: Tensor | None, T: int, block_p: int, nseg: int, reverse: bool,
) -> tuple[Tensor, Tensor]:
    """Each segment's own end state (forward: from x, B) or start-state gradient (backward: from dy, C)."""
    b, L, h, p = u.shape
    n = k.shape[-1]
    acc_torch = torch.float64 if u.dtype == torch.float64 else torch.float32
    seg_state = torch.empty(b, h, nseg, p, n, device=u.device, dtype=acc_torch)
    seg_decay = torch.empty(b, h, nseg, device=u.device, dtype=acc_torch)
    chunks_per_seg = triton.cdiv(triton.cdiv(L, T), nseg)
    s = scale if scale is not None else log_a
    # The forward needs segments 0 .. nseg-2, the backward 1 .. nseg-1.
    grid = (b * h, triton.cdiv(p, block_p), nseg - 1)
    _segment_state_kernel[grid](
        u, log_a, k, s, seg_state, seg_decay,
        L, h, h // k.shape[2], p, n, chunks_per_seg, nseg, 1 if reverse else 0,
        u.stride(0), u.stride(1), u.stride(2),
        log_a.stride(0), log_a.stride(1), log_a.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        T=T, BLOCK_P=block_p, BLOCK_N=_pow2_at_least_16(n), REVERSE=reverse, HAS_SCALE=scale is not None,
        ACC=_acc_dtype(u.dtype), DOT_PRECISION=_dot_precision(u.dtype), num_warps=4, num_stages=2,
    )
    return seg_state, seg_decay


def _ssd_forward(
    x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, scale: Tensor | None, D: Tensor | None,
    initial_state: Tensor | None, chunk_size: int, store_states: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns y, the final state (float32 / float64) and, if store_states, the entering state of each chunk."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    T = _chunk_block(chunk_size, x.dtype)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    nchunks = triton.cdiv(L, T)
    block_p, nseg, num_warps, num_stages = _fwd_config(b * h, p, nchunks, x.device)
    nseg = max(1, min(nseg, nchunks))
    chunks_per_seg = triton.cdiv(nchunks, nseg)
    nseg = triton.cdiv(nchunks, chunks_per_seg)  # no empty segments

    y = torch.empty(b, L, h, p, device=x.device, dtype=x.dtype)
    final = torch.empty(b, h, p, n, device=x.device, dtype=acc_torch)
    states = torch.empty(b, h, nchunks, p, n, device=x.device, dtype=acc_torch) if store_states else None
    if nseg > 1:
        seg_state, seg_decay = _segment_states(x, log_a, B, scale, T, block_p, nseg, reverse=False)
    else:
        seg_state = seg_decay = final  # never read
    s = scale if scale is not None else log_a  # any tensor with log_a's strides: never read
    h0 = initial_state if initial_state is not None else final  # never read

    grid = (b * h, triton.cdiv(p, block_p), nseg)
    _ssd_fwd_kernel[grid](
        x, log_a, B, C, s, D if D is not None else log_a, h0, seg_state, seg_decay,
        y, final, states if states is not None else final,
        L, h, h // B.shape[2], h // C.shape[2], p, n, chunks_per_seg, nseg,
        x.stride(0), x.stride(1), x.stride(2),
        log_a.stride(0), log_a.stride(1), log_a.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        h0.stride(0), h0.stride(1), h0.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        T=T, BLOCK_P=block_p, BLOCK_N=_pow2_at_least_16(n),
        HAS_SCALE=scale is not None, HAS_D=D is not None, HAS_H0=initial_state is not None,
        STORE_STATES=store_states, ACC=_acc_dtype(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return y, final, states


def _ssd_backward(
    x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, scale: Tensor | None, D: Tensor | None, states: Tensor,
    dy: Tensor, dfinal: Tensor | None, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """Returns dx, dlog_a, dB, dC, dscale, dD, d initial_state (float32 / float64 where reduced here)."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    gb, gc = B.shape[2], C.shape[2]
    T = _chunk_block(chunk_size, x.dtype)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    nchunks = triton.cdiv(L, T)
    block_p, nseg, num_warps, num_stages = _bwd_config(b * h, p, nchunks, x.device)
    nseg = max(1, min(nseg, nchunks))
    chunks_per_seg = triton.cdiv(nchunks, nseg)
    nseg = triton.cdiv(nchunks, chunks_per_seg)
    splits = triton.cdiv(p, block_p)
    dev = x.device

    dx = torch.empty(b, L, h, p, device=dev, dtype=x.dtype)
    # dB and dC come per head (and per p block): the heads of a group and the p blocks are summed below, in float32
    # unless there is nothing to sum.
    db = torch.empty(splits, b, L, h, n, device=dev, dtype=B.dtype if splits == 1 and gb == h else acc_torch)
    dc = torch.empty(splits, b, L, h, n, device=dev, dtype=C.dtype if splits == 1 and gc == h else acc_torch)
    dlog_a = torch.empty(splits, b, L, h, device=dev, dtype=acc_torch)
    dscale = torch.empty(splits, b, L, h, device=dev, dtype=acc_torch) if scale is not None else None
    dd = torch.empty(b, h, nseg, p, device=dev, dtype=acc_torch) if D is not None else None
    dh0 = torch.empty(b, h, p, n, device=dev, dtype=acc_torch)
    if dfinal is not None:
        dfinal = dfinal.to(acc_torch).contiguous()
    if nseg > 1:
        seg_dstate, seg_decay = _segment_states(dy, log_a, C, None, T, block_p, nseg, reverse=True)
    else:
        seg_dstate = seg_decay = dh0  # never read
    s = scale if scale is not None else log_a

    grid = (b * h, splits, nseg)
    _ssd_bwd_kernel[grid](
        x, log_a, B, C, s, D if D is not None else log_a, states, dy, dfinal if dfinal is not None else dh0,
        seg_dstate, seg_decay,
        dx, db, dc, dlog_a, dscale if dscale is not None else dlog_a, dd if dd is not None else dh0, dh0,
        L, h, h // gb, h // gc, p, n, chunks_per_seg, nseg,
        x.stride(0), x.stride(1), x.stride(2),
        log_a.stride(0), log_a.stride(1), log_a.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2),
        db.stride(0), db.stride(1), db.stride(2), db.stride(3),
        dlog_a.stride(0),
        T=T, BLOCK_P=block_p, BLOCK_N=_pow2_at_least_16(n),
        HAS_SCALE=scale is not None, HAS_D=D is not None, HAS_DFINAL=dfinal is not None,
        ACC=_acc_dtype(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )

    def reduced(grad: Tensor, groups: int) -> Tensor:
        grad = grad.sum(0) if grad.shape[0] > 1 else grad[0]
        return grad if groups == h else grad.view(b, L, groups, h // groups, n).sum(3)

    dB = reduced(db, gb).to(B.dtype)
    dC = reduced(dc, gc).to(C.dtype)
    dlog_a = dlog_a.sum(0) if splits > 1 else dlog_a[0]
    if dscale is not None:
        dscale = dscale.sum(0) if splits > 1 else dscale[0]
    dD = dd.sum((0, 2, 3)) if dd is not None else None
    return dx, dlog_a, dB, dC, dscale, dD, dh0


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public function


class _SSDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log_a, B, C, scale, D, initial_state, chunk_size):
        y, final, states = _ssd_forward(x, log_a, B, C, scale, D, initial_state, chunk_size, store_states=True)
        ctx.save_for_backward(x, log_a, B, C, scale, D, initial_state, states)
        ctx.chunk_size = chunk_size
        return y, final.to(x.dtype)

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, log_a, B, C, scale, D, initial_state, states = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dy = _last_dim_contiguous(dy)
        dx, dlog_a, dB, dC, dscale, dD, dh0 = _ssd_backward(
            x, log_a, B, C, scale, D, states, dy, dfinal, ctx.chunk_size
        )
        grads = [dx, dlog_a.to(log_a.dtype), dB, dC, None, None, None, None]
        if scale is not None:
            grads[4] = dscale.to(scale.dtype)
        if D is not None:
            grads[5] = dD.to(D.dtype)
        if initial_state is not None:
            grads[6] = dh0.to(initial_state.dtype)
        return tuple(grads)


def _check_inputs(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, scale, D, initial_state) -> None:
    """The shapes reference.ssd_chunked accepts, checked once here with the same messages' content."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (b, L, h, p), got {tuple(x.shape)}")
    b, L, h, p = x.shape
    if tuple(log_a.shape) != (b, L, h):
        raise ValueError(f"log_a must have shape (b, L, h) = {(b, L, h)}, got {tuple(log_a.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, L):
        raise ValueError(f"B must have shape (b, L, gb, n) = ({b}, {L}, gb, n), got {tuple(B.shape)}")
    n = B.shape[3]
    if C.dim() != 4 or C.shape[:2] != (b, L) or C.shape[3] != n:
        raise ValueError(f"C must have shape (b, L, gc, n) = ({b}, {L}, gc, {n}), got {tuple(C.shape)}")
    for name, groups in (("B", B.shape[2]), ("C", C.shape[2])):
        if groups < 1 or h % groups != 0:
            raise ValueError(f"{name} has {groups} groups, which must divide the number of heads h={h}")
    if scale is not None and tuple(scale.shape) != (b, L, h):
        raise ValueError(f"scale must have shape (b, L, h) = {(b, L, h)}, got {tuple(scale.shape)}")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"D must have shape (h,) = ({h},), got {tuple(D.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(
            f"initial_state must have shape (b, h, p, n) = {(b, h, p, n)}, got {tuple(initial_state.shape)}"
        )


def ssd_chunked_triton(
    x: Tensor,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The chunked SSD scan on the GPU (or the Triton interpreter); same contract as reference.ssd_chunked.

    x (b, L, h, p); log_a (b, L, h); B (b, L, gb, n); C (b, L, gc, n); scale (b, L, h) | None; D (h,) | None;
    initial_state (b, h, p, n) | None. Returns y (b, L, h, p) and the final state (b, h, p, n), both in x's dtype,
    differentiable in every tensor input. chunk_size is rounded to a power of two in [16, 128] (at most 64 in
    float32 and float64, whose exact products compile for minutes at 128).
    """
    _check_inputs(x, log_a, B, C, scale, D, initial_state)
    b, L, h, p = x.shape
    if L == 0:  # nothing to scan: the state passes through unchanged
        final = initial_state if initial_state is not None else x.new_zeros(b, h, p, B.shape[3])
        return x.new_empty(b, 0, h, p), final.to(x.dtype)
    if B.dtype != x.dtype or C.dtype != x.dtype:  # the matrix products need one operand dtype
        B, C = B.to(x.dtype), C.to(x.dtype)
    x, B, C = _last_dim_contiguous(x), _last_dim_contiguous(B), _last_dim_contiguous(C)
    if initial_state is not None:
        initial_state = _last_dim_contiguous(initial_state)
    inputs = (x, log_a, B, C, scale, D, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _SSDChunked.apply(*inputs, chunk_size)
    # Inference: no autograd node, and no entering states stored for a backward that will not come.
    y, final, _ = _ssd_forward(*inputs, chunk_size, store_states=False)
    return y, final.to(x.dtype)
