"""Stage 3's per-chunk divergence and its gradient in one Triton kernel: forward KL, reverse KL or the generalized
JSD at a temperature, plus an optional cross-entropy on the true next tokens.

Same function as `reference.chunk_divergence` for every divergence it knows ("forward_kl", "reverse_kl", "jsd"): for a
chunk of rows of student logits s and teacher logits t (n, V), the sums over rows of the divergence (each row
optionally weighted) and of the cross-entropy, and the gradient of kl_scale * divergence + ce_scale * cross-entropy
with respect to s, written in the dtype the LM head's backward matmul wants.

Why a kernel: through PyTorch the chunk is about fifteen passes over (rows x vocabulary) float32 tensors (the
logits' upcasts, the division by the temperature, two log-softmaxes, exp, products, sums, their autograd, the
gradient's downcast): at SmolLM2's 49,152-word vocabulary a stage-3 step of 32K tokens spent about 55 of its 229 ms
of kernel time there (H200 profile, 2026-12-02). Here each program owns one row and reads it twice: a first pass
keeps running maxima and sums of exponentials per lane (the log-sum-exps of s/T, t/T and, for the cross-entropy,
s, and the weighted sum that gives the KL), a second writes the gradient. Arithmetic in float32.

The JSD reads the row three times: its log m needs both log-sum-exps before anything else, so the first pass takes
only those, the second the divergence and the one row sum its gradient needs, the third writes the gradient. With
a = log p_s, d = log p_t - a and r = log m - a = log((1 - beta) + beta e^d) (a stable logaddexp), per row

    JSD = beta sum_k p_t_k (d_k - r_k) - (1 - beta) c,   c = sum_k p_s_k r_k,

and since d JSD / d p_s_j = (1 - beta)(a_j - log m_j) = -(1 - beta) r_j (the rest cancels: beta p_t + (1 - beta) p_s
= m), through the softmax at temperature T:  d JSD / d s_j = (1 - beta) / T * p_s_j (c - r_j). Written with d and r,
the terms stay small where p_s and p_t agree, and a lane where either underflows gives 0 times a finite number.

Only relative imports in this folder: `distill export` copies these files beside an exported model's modeling code.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_FLOOR = tl.constexpr(-1.0e30)  # a finite "minus infinity", so running maxima never subtract infinities


@triton.jit
def _online(m, z, x, mask):
    """One block's update of per-lane running maxima m and sums z of exp(x - m)."""
    new_m = tl.maximum(m, x)
    z = z * tl.exp(m - new_m) + tl.where(mask, tl.exp(x - new_m), 0.0)
    return new_m, z


@triton.jit
def _log_z(m, z):
    """(max, log of the sum of exp(x - max)) from per-lane running maxima m and sums z."""
    big = tl.max(m, axis=0)
    return big, tl.log(tl.sum(z * tl.exp(m - big), axis=0))


@triton.jit
def _lse(m, z):
    big, log_z = _log_z(m, z)
    return big + log_z, big


@triton.jit
def _log_mix(d, log_beta, log_1mb):
    """r = log((1 - beta) + beta e^d): logaddexp(log(1 - beta), log(beta) + d) as max + log(1 + exp(-|difference|)),
    finite however far d goes either way."""
    u = log_beta + d
    return tl.maximum(u, log_1mb) + tl.log(1.0 + tl.exp(-tl.abs(u - log_1mb)))


@triton.jit
def _divergence_kernel(
    s_ptr, t_ptr, g_ptr, label_ptr, div_ptr, ce_ptr, w_ptr,
    V, ss, st, sg, inv_temp, kl_scale, ce_scale, beta, log_beta, log_1mb,
    REVERSE: tl.constexpr, JSD: tl.constexpr, HAS_CE: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, g_row = s_ptr + row * ss, t_ptr + row * st, g_ptr + row * sg
    lanes = tl.arange(0, BLOCK)
    m_s = tl.full((BLOCK,), _FLOOR, tl.float32)
    m_t = tl.full((BLOCK,), _FLOOR, tl.float32)
    m_1 = tl.full((BLOCK,), _FLOOR, tl.float32)
    z_s = tl.zeros((BLOCK,), tl.float32)
    z_t = tl.zeros((BLOCK,), tl.float32)
    z_1 = tl.zeros((BLOCK,), tl.float32)
    w = tl.zeros((BLOCK,), tl.float32)  # sum of exp(x_ref - m_ref) * (x_t - x_s): ref = t (forward) or s (reverse)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(mask, s * inv_temp, _FLOOR)
        xt = tl.where(mask, t * inv_temp, _FLOOR)
        if not JSD:  # the JSD's sum needs the log-sum-exps first: its own pass below
            diff = tl.where(mask, xt - xs, 0.0)
            if REVERSE:
                new_m = tl.maximum(m_s, xs)
                w = w * tl.exp(m_s - new_m) + tl.where(mask, tl.exp(xs - new_m), 0.0) * diff
            else:
                new_m = tl.maximum(m_t, xt)
                w = w * tl.exp(m_t - new_m) + tl.where(mask, tl.exp(xt - new_m), 0.0) * diff
        m_s, z_s = _online(m_s, z_s, xs, mask)
        m_t, z_t = _online(m_t, z_t, xt, mask)
        if HAS_CE:
            m_1, z_1 = _online(m_1, z_1, tl.where(mask, s, _FLOOR), mask)
    big_s, lz_s = _log_z(m_s, z_s)
    big_t, lz_t = _log_z(m_t, z_t)
    lse_s, lse_t = big_s + lz_s, big_t + lz_t
    c = 0.0
    if JSD:  # second pass: sum p_t (d - r) and c = sum p_s r (see the module's docstring)
        # log p = (x - max) - log z, not x - lse: exact near the max, where a peaked row's gradient p_s (c - r) is a
        # small difference that lse's rounding (~1e-6 at |lse| ~ 20) would swamp (4x the error, seen at T = 0.7).
        acc_t = tl.zeros((BLOCK,), tl.float32)
        acc_c = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + lanes
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            log_ps = (s * inv_temp - big_s) - lz_s
            log_pt = (t * inv_temp - big_t) - lz_t
            d = log_pt - log_ps
            r = _log_mix(d, log_beta, log_1mb)
            acc_t += tl.where(mask, tl.exp(log_pt) * (d - r), 0.0)
            acc_c += tl.where(mask, tl.exp(log_ps) * r, 0.0)
        c = tl.sum(acc_c, axis=0)
        div = beta * tl.sum(acc_t, axis=0) - (1.0 - beta) * c
    elif REVERSE:  # KL(p_s || p_t) = sum p_s (x_s - x_t) - lse_s + lse_t
        div = -tl.sum(w * tl.exp(m_s - big_s), axis=0) / tl.exp(lse_s - big_s) - lse_s + lse_t
    else:  # KL(p_t || p_s) = sum p_t (x_t - x_s) - lse_t + lse_s
        div = tl.sum(w * tl.exp(m_t - big_t), axis=0) / tl.exp(lse_t - big_t) - lse_t + lse_s
    row_kl_scale = kl_scale
    if HAS_W:  # this row's weight scales its divergence and that part of its gradient
        weight = tl.load(w_ptr + row).to(tl.float32)
        row_kl_scale = kl_scale * weight
        tl.store(div_ptr + row, div * weight)
    else:
        tl.store(div_ptr + row, div)
    label = -1
    lse_1 = 0.0
    ce_row_scale = 0.0
    if HAS_CE:
        lse_1, _ = _lse(m_1, z_1)
        label = tl.load(label_ptr + row)
        ok = label >= 0  # the ignore index (-100): no loss and no gradient from this row's cross-entropy
        s_label = tl.load(s_row + tl.where(ok, label, 0)).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(ok, lse_1 - s_label, 0.0))
        ce_row_scale = tl.where(ok, ce_scale, 0.0)
    # Last pass: d/ds of kl_scale * div (+ ce_scale * ce).
    for start in range(0, V, BLOCK):
        cols = start + lanes
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        if JSD:  # as in the second pass
            log_ps = (s * inv_temp - big_s) - lz_s
            log_pt = (t * inv_temp - big_t) - lz_t
        else:
            log_ps = s * inv_temp - lse_s
            log_pt = t * inv_temp - lse_t
        ps = tl.exp(log_ps)
        if JSD:
            g = row_kl_scale * inv_temp * (1.0 - beta) * ps * (c - _log_mix(log_pt - log_ps, log_beta, log_1mb))
        elif REVERSE:
            g = row_kl_scale * inv_temp * ps * (log_ps - log_pt - div)
        else:
            g = row_kl_scale * inv_temp * (ps - tl.exp(log_pt))
        if HAS_CE:
            g += ce_row_scale * (tl.exp(s - lse_1) - tl.where(cols == label, 1.0, 0.0))
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def chunk_divergence_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kl_scale: float = 1.0,
    labels: torch.Tensor | None = None,
    ce_scale: float = 0.0,
    grad_dtype: torch.dtype | None = None,
    block: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """reference.chunk_divergence (forward_kl, reverse_kl or jsd, whose teacher weight is `beta`); `block` (a power
    of 2) is the columns a program reads at a time (default: up to 2048); `weights` (rows,), one per row, scale each
    row's divergence."""
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"the divergence kernel computes forward_kl, reverse_kl and jsd, not {divergence!r}")
    jsd = divergence == "jsd"
    if jsd and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1 (it vanishes at either end), got beta={beta}")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must both be (rows, vocabulary), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if labels is not None and tuple(labels.shape) != (student_logits.shape[0],):
        raise ValueError(f"labels must have shape (rows,) = ({student_logits.shape[0]},), got {tuple(labels.shape)}")
    if weights is not None and tuple(weights.shape) != (student_logits.shape[0],):
        raise ValueError(f"weights must have shape (rows,) = ({student_logits.shape[0]},), got {tuple(weights.shape)}")
    s = student_logits if student_logits.stride(1) == 1 else student_logits.contiguous()
    t = teacher_logits if teacher_logits.stride(1) == 1 else teacher_logits.contiguous()
    n, V = s.shape
    grad = torch.empty((n, V), dtype=grad_dtype or s.dtype, device=s.device)
    div_rows = torch.empty((n,), dtype=torch.float32, device=s.device)
    ce_rows = torch.empty((n,), dtype=torch.float32, device=s.device) if labels is not None else div_rows
    block = block or min(2048, triton.next_power_of_2(V))
    if n:
        _divergence_kernel[(n,)](
            s, t, grad, labels if labels is not None else div_rows, div_rows, ce_rows,
            weights.contiguous() if weights is not None else div_rows,
            V, s.stride(0), t.stride(0), grad.stride(0), 1.0 / temperature, float(kl_scale), float(ce_scale),
            # beta's logs only feed the JSD; other divergences get placeholders (beta may be anything there)
            float(beta) if jsd else 0.5, math.log(beta) if jsd else 0.0, math.log1p(-beta) if jsd else 0.0,
            REVERSE=divergence == "reverse_kl", JSD=jsd, HAS_CE=labels is not None, HAS_W=weights is not None,
            BLOCK=block,
            num_warps=8 if block >= 1024 else 4,
        )
    return div_rows.sum(), (ce_rows.sum() if labels is not None else None), grad
