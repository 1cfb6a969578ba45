"""The MOHAWK stage-1 loss as fused Triton kernels: no L x L tensor ever exists in memory.

    loss = mean over (batch, head) of sqrt(S),   S = sum_{i >= j} (A_ij - M_ij)^2
    A = softmax(q k^T * softmax_scale + causal mask)                         (the frozen teacher's attention)
    M_ij = (C_i . B_j) * exp(c_i - c_j) * scale_j,   c = cumsum(log_a)       (the student's SSD mixing matrix)

Same signature and value as `reference.stage1_loss`. The work goes in tiles of BLOCK x BLOCK, flash-attention style:

1. `_softmax_lse_kernel`: one pass over q k^T per row tile gives each row's log-sum-exp (online max and sum).
2. `_stage1_rows_kernel`, one program per row tile: recomputes A (from q, k and the stored log-sum-exp) and M (from
   C, B, the decays and scale) tile by tile and sums (A - M)^2 per row. When a gradient is wanted it also
   accumulates the row-side derivatives: dS/dC_i = -2 sum_j D_ij E_ij scale_j B_j and sum_j D_ij M_ij.
3. `_stage1_cols_kernel` (backward), one program per column tile, the transposed walk: dS/dB_j, dS/dscale_j and
   sum_i D_ij M_ij. It needs only the inputs and the stored log-sum-exp.

With D = A - M and E_ij = exp(c_i - c_j): dS/dM = -2 D; dS/dc_k = -2 (sum_j D_kj M_kj - sum_i D_ik M_ik) and
dS/dlog_a_t = sum_{k >= t} dS/dc_k. The per-head factor dloss/dS = 1 / (2 sqrt(S) * batch * heads), the sums over
the heads that share a B or C group and the reverse cumsum are applied to the O(L) per-head results in PyTorch.

Decays. Kernels work in base 2 (exp2 is the fast instruction). Each position keeps its decay cumsum local to its
tile (small numbers, accurate in float32) and each tile the float64 sum of everything before it. Below the diagonal
(column tile J before row tile I) the decay factors into a row part and a column part,
    exp2(c_i - c_j) = exp2(cl_i) * exp2(T_I - T_J - cl_j),   both factors <= 1 because log_a <= 0,
so those tiles need one multiply per element instead of an exp; only the diagonal tile takes exp2(cl_i - cl_j).

Numerics: float32 accumulation everywhere. bf16/fp16 inputs go to the tensor cores as they are (products of two
bf16 are exact in float32); float32 inputs use 3xTF32 ("tf32x3"), about float32 accuracy. The gradient matmuls
round D * decay to the input dtype, as flash attention's backward does. q and k belong to the frozen teacher: they
are detached and get no gradient. Requires log_a <= 0 (the API contract).

Only relative imports here: `distill export` may copy the kernel files beside an exported model.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["stage1_loss_triton"]

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _softmax_lse_kernel(
    q_ptr, k_ptr, lse_ptr,
    L, H, num_tiles, heads_per_k,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, QK_PRECISION: tl.constexpr,
):
    """lse[b, h, i] = log2 sum_{j <= i} exp2(q_i . k_j * qk_scale), qk_scale = softmax_scale * log2(e)."""
    tile_i = num_tiles - 1 - tl.program_id(0)  # longest rows first: a shorter tail
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_ptr += b.to(tl.int64) * stride_qb + h * stride_qh
    k_ptr += b.to(tl.int64) * stride_kb + (h // heads_per_k) * stride_kh

    offs = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    rows = tile_i * BLOCK + offs
    row_ok = rows < L
    q_i = tl.load(q_ptr + rows[:, None].to(tl.int64) * stride_ql + dims[None, :], mask=row_ok[:, None], other=0.0)

    row_max = tl.full([BLOCK], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK], tl.float32)
    for tile_j in range(0, tile_i):  # below the diagonal: every entry counts, no mask
        cols = tile_j * BLOCK + offs
        k_j = tl.load(k_ptr + cols[:, None].to(tl.int64) * stride_kl + dims[None, :])
        s = tl.dot(q_i, tl.trans(k_j), input_precision=QK_PRECISION) * qk_scale
        new_max = tl.maximum(row_max, tl.max(s, 1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
        row_max = new_max
    # The diagonal tile: the causal mask (which also hides columns past L from every real row).
    k_j = tl.load(k_ptr + rows[:, None].to(tl.int64) * stride_kl + dims[None, :], mask=row_ok[:, None], other=0.0)
    s = tl.dot(q_i, tl.trans(k_j), input_precision=QK_PRECISION) * qk_scale
    s = tl.where(rows[:, None] >= rows[None, :], s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, 1))
    row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, new_max + tl.log2(row_sum), mask=row_ok)


@triton.jit
def _stage1_rows_kernel(
    q_ptr, k_ptr, c_ptr, b_ptr, lse_ptr, cl_ptr, start_ptr, scale_ptr,
    sq_ptr, rowr_ptr, dc_ptr,
    L, H, num_tiles, heads_per_k, heads_per_b, heads_per_c,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_cb, stride_cl, stride_ch,
    stride_bb, stride_bl, stride_bh,
    stride_db, stride_dl, stride_dh,
    qk_scale,
    HEAD_DIM: tl.constexpr, STATE_DIM: tl.constexpr, BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr, WITH_GRAD: tl.constexpr,
    QK_PRECISION: tl.constexpr, CB_PRECISION: tl.constexpr,
):
    """Per row i: sq_i = sum_j D_ij^2; with WITH_GRAD also rowr_i = sum_j D_ij M_ij and
    dc_i = sum_j D_ij E_ij scale_j B_j (dS/dC_i = -2 dc_i), where D = A - M."""
    tile_i = num_tiles - 1 - tl.program_id(0)  # longest rows first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_ptr += b.to(tl.int64) * stride_qb + h * stride_qh
    k_ptr += b.to(tl.int64) * stride_kb + (h // heads_per_k) * stride_kh
    c_ptr += b.to(tl.int64) * stride_cb + (h // heads_per_c) * stride_ch
    b_ptr += b.to(tl.int64) * stride_bb + (h // heads_per_b) * stride_bh
    lse_ptr += bh.to(tl.int64) * L
    scale_ptr += bh.to(tl.int64) * L
    cl_ptr += bh.to(tl.int64) * num_tiles * BLOCK
    start_ptr += bh * num_tiles

    offs = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    states = tl.arange(0, STATE_DIM)
    rows = tile_i * BLOCK + offs
    row_ok = rows < L
    row_off = rows[:, None].to(tl.int64)
    q_i = tl.load(q_ptr + row_off * stride_ql + dims[None, :], mask=row_ok[:, None], other=0.0)
    c_i = tl.load(c_ptr + row_off * stride_cl + states[None, :], mask=row_ok[:, None], other=0.0)
    # Rows past L get A = 0 (infinite log-sum-exp) and M = 0 (zero decay), hence D = 0: no mask in the loop.
    lse_i = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    cl_i = tl.load(cl_ptr + rows)
    decay_i = tl.where(row_ok, tl.exp2(cl_i), 0.0)  # from the tile's start to row i
    start_i = tl.load(start_ptr + tile_i)

    sq = tl.zeros([BLOCK], tl.float32)
    rowr = tl.zeros([BLOCK], tl.float32)
    dc = tl.zeros([BLOCK, STATE_DIM], tl.float32)
    for tile_j in range(0, tile_i):  # column tiles wholly below the diagonal: separable decay, no mask
        cols = tile_j * BLOCK + offs
        col_off = cols[:, None].to(tl.int64)
        k_j = tl.load(k_ptr + col_off * stride_kl + dims[None, :])
        b_j = tl.load(b_ptr + col_off * stride_bl + states[None, :])
        # From step j (exclusive) to the start of tile I: T_I - T_J - cl_j, the big part subtracted in float64.
        decay_j = tl.exp2((start_i - tl.load(start_ptr + tile_j)).to(tl.float32) - tl.load(cl_ptr + cols))
        if HAS_SCALE:
            decay_j = decay_j * tl.load(scale_ptr + cols)
        decay = decay_i[:, None] * decay_j[None, :]  # E_ij * scale_j
        a = tl.exp2(tl.dot(q_i, tl.trans(k_j), input_precision=QK_PRECISION) * qk_scale - lse_i[:, None])
        m = tl.dot(c_i, tl.trans(b_j), input_precision=CB_PRECISION) * decay
        d = a - m
        sq += tl.sum(d * d, 1)
        if WITH_GRAD:
            rowr += tl.sum(d * m, 1)
            dc = tl.dot((d * decay).to(b_j.dtype), b_j, dc, input_precision=CB_PRECISION)

    # The diagonal tile: causal mask, and the decay straight from the local cumsums.
    causal = (rows[:, None] >= rows[None, :]) & row_ok[:, None]
    k_j = tl.load(k_ptr + row_off * stride_kl + dims[None, :], mask=row_ok[:, None], other=0.0)
    b_j = tl.load(b_ptr + row_off * stride_bl + states[None, :], mask=row_ok[:, None], other=0.0)
    decay = tl.exp2(tl.where(causal, cl_i[:, None] - cl_i[None, :], float("-inf")))
    if HAS_SCALE:
        decay = decay * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[None, :]
    a = tl.exp2(tl.dot(q_i, tl.trans(k_j), input_precision=QK_PRECISION) * qk_scale - lse_i[:, None])
    a = tl.where(causal, a, 0.0)
    m = tl.dot(c_i, tl.trans(b_j), input_precision=CB_PRECISION) * decay
    d = a - m
    sq += tl.sum(d * d, 1)
    tl.store(sq_ptr + bh.to(tl.int64) * L + rows, sq, mask=row_ok)
    if WITH_GRAD:
        rowr += tl.sum(d * m, 1)
        dc = tl.dot((d * decay).to(b_j.dtype), b_j, dc, input_precision=CB_PRECISION)
        tl.store(rowr_ptr + bh.to(tl.int64) * L + rows, rowr, mask=row_ok)
        dc_ptr += b.to(tl.int64) * stride_db + h * stride_dh
        tl.store(dc_ptr + row_off * stride_dl + states[None, :], dc, mask=row_ok[:, None])


@triton.jit
def _stage1_cols_kernel(
    q_ptr, k_ptr, c_ptr, b_ptr, lse_ptr, cl_ptr, start_ptr, scale_ptr,
    db_ptr, ds_ptr, colr_ptr,
    L, H, num_tiles, heads_per_k, heads_per_b, heads_per_c,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_cb, stride_cl, stride_ch,
    stride_bb, stride_bl, stride_bh,
    stride_db, stride_dl, stride_dh,
    qk_scale,
    HEAD_DIM: tl.constexpr, STATE_DIM: tl.constexpr, BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr, QK_PRECISION: tl.constexpr, CB_PRECISION: tl.constexpr,
):
    """Per column j, with v_j = sum_i D_ij E_ij C_i: db_j = scale_j v_j (dS/dB_j = -2 db_j),
    ds_j = B_j . v_j (dS/dscale_j = -2 ds_j) and colr_j = sum_i D_ij M_ij. Tiles are held transposed, (j, i)."""
    tile_j = tl.program_id(0)  # tile 0 has the most rows below it: it starts first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_ptr += b.to(tl.int64) * stride_qb + h * stride_qh
    k_ptr += b.to(tl.int64) * stride_kb + (h // heads_per_k) * stride_kh
    c_ptr += b.to(tl.int64) * stride_cb + (h // heads_per_c) * stride_ch
    b_ptr += b.to(tl.int64) * stride_bb + (h // heads_per_b) * stride_bh
    lse_ptr += bh.to(tl.int64) * L
    scale_ptr += bh.to(tl.int64) * L
    cl_ptr += bh.to(tl.int64) * num_tiles * BLOCK
    start_ptr += bh * num_tiles

    offs = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    states = tl.arange(0, STATE_DIM)
    cols = tile_j * BLOCK + offs
    col_ok = cols < L
    col_off = cols[:, None].to(tl.int64)
    k_j = tl.load(k_ptr + col_off * stride_kl + dims[None, :], mask=col_ok[:, None], other=0.0)
    b_j = tl.load(b_ptr + col_off * stride_bl + states[None, :], mask=col_ok[:, None], other=0.0)
    cl_j = tl.load(cl_ptr + cols)
    if HAS_SCALE:
        scale_j = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    start_j = tl.load(start_ptr + tile_j)

    colr = tl.zeros([BLOCK], tl.float32)
    v = tl.zeros([BLOCK, STATE_DIM], tl.float32)

    # The diagonal tile: causal mask (row i >= column j, and i < L), decay from the local cumsums.
    causal = (cols[None, :] >= cols[:, None]) & col_ok[None, :]
    q_i = tl.load(q_ptr + col_off * stride_ql + dims[None, :], mask=col_ok[:, None], other=0.0)
    c_i = tl.load(c_ptr + col_off * stride_cl + states[None, :], mask=col_ok[:, None], other=0.0)
    lse_i = tl.load(lse_ptr + cols, mask=col_ok, other=float("inf"))
    decay = tl.exp2(tl.where(causal, cl_j[None, :] - cl_j[:, None], float("-inf")))  # E, no scale
    scaled = decay
    if HAS_SCALE:
        scaled = decay * scale_j[:, None]
    a = tl.exp2(tl.dot(k_j, tl.trans(q_i), input_precision=QK_PRECISION) * qk_scale - lse_i[None, :])
    a = tl.where(causal, a, 0.0)
    m = tl.dot(b_j, tl.trans(c_i), input_precision=CB_PRECISION) * scaled
    d = a - m
    colr += tl.sum(d * m, 1)
    v = tl.dot((d * decay).to(c_i.dtype), c_i, v, input_precision=CB_PRECISION)

    # Row tiles wholly below: separable decay exp2(cl_i) * exp2(T_I - T_J - cl_j), no mask but rows past L.
    for tile_i in range(tile_j + 1, num_tiles):
        rows = tile_i * BLOCK + offs
        row_ok = rows < L
        row_off = rows[:, None].to(tl.int64)
        q_i = tl.load(q_ptr + row_off * stride_ql + dims[None, :], mask=row_ok[:, None], other=0.0)
        c_i = tl.load(c_ptr + row_off * stride_cl + states[None, :], mask=row_ok[:, None], other=0.0)
        lse_i = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))  # rows past L: A = 0
        decay_i = tl.where(row_ok, tl.exp2(tl.load(cl_ptr + rows)), 0.0)  # rows past L: M = 0
        decay_j = tl.exp2((tl.load(start_ptr + tile_i) - start_j).to(tl.float32) - cl_j)
        decay = decay_j[:, None] * decay_i[None, :]
        scaled = decay
        if HAS_SCALE:
            scaled = decay * scale_j[:, None]
        a = tl.exp2(tl.dot(k_j, tl.trans(q_i), input_precision=QK_PRECISION) * qk_scale - lse_i[None, :])
        m = tl.dot(b_j, tl.trans(c_i), input_precision=CB_PRECISION) * scaled
        d = a - m
        colr += tl.sum(d * m, 1)
        v = tl.dot((d * decay).to(c_i.dtype), c_i, v, input_precision=CB_PRECISION)

    vec = bh.to(tl.int64) * L + cols
    tl.store(colr_ptr + vec, colr, mask=col_ok)
    tl.store(ds_ptr + vec, tl.sum(b_j.to(tl.float32) * v, 1), mask=col_ok)
    if HAS_SCALE:
        v = v * scale_j[:, None]
    db_ptr += b.to(tl.int64) * stride_db + h * stride_dh
    tl.store(db_ptr + col_off * stride_dl + states[None, :], v, mask=col_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _default_config() -> tuple[int, int, int]:
    """(BLOCK, num_warps, num_stages). (64, 4, 3) was the fastest of those timed on an H100 at L = 2048 to 32768
    (bench/results_stage1.md). The interpreter gets small tiles so that the tests cover several of them."""
    if _interpreting():
        return 16, 1, 1
    return 64, 4, 3


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 takes 3xTF32 (about float32 accuracy); half types ignore it."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _common_dtype(name: str, x: Tensor, y: Tensor) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, y.dtype)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"stage1_loss_triton takes {name} in float16, bfloat16 or float32, got {dtype} "
                        "(use reference.stage1_loss for float64)")
    return dtype


def _last_dim_contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _decay_cumsums(log_a: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """log2 decay cumsums split at tile boundaries, so no large float32 number is ever subtracted.

    Returns cl (b, h, tiles * block) float32, the inclusive cumsum of log_a * log2(e) from the start of each
    position's tile (the padding past L adds zeros), and start (b, h, tiles) float64, the sum of everything before
    each tile.
    """
    b, L, h = log_a.shape
    tiles = triton.cdiv(L, block)
    steps = F.pad(log_a.detach().to(torch.float64).transpose(1, 2) * LOG2E, (0, tiles * block - L))
    local = steps.view(b, h, tiles, block).cumsum(-1)
    totals = local[..., -1]
    start = totals.cumsum(-1) - totals
    return local.reshape(b, h, tiles * block).to(torch.float32).contiguous(), start.contiguous()


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _Inputs:
    """The kernels' view of one call: dtype-unified tensors, per-head vectors and the launch shape."""

    def __init__(self, q, k, softmax_scale, log_a, B, C, scale, config):
        b, L, h, d = q.shape
        qk_dtype = _common_dtype("q and k", q, k)
        bc_dtype = _common_dtype("B and C", B, C)
        self.q = _last_dim_contiguous(q.detach(), qk_dtype)
        self.k = _last_dim_contiguous(k.detach(), qk_dtype)
        self.B = _last_dim_contiguous(B.detach(), bc_dtype)
        self.C = _last_dim_contiguous(C.detach(), bc_dtype)
        self.block, self.num_warps, self.num_stages = config
        self.cl, self.start = _decay_cumsums(log_a, self.block)
        # scale as (b, h, L) float32 (a dummy pointer when absent: HAS_SCALE=False never reads it)
        self.scale = (scale.detach().to(torch.float32).transpose(1, 2).contiguous() if scale is not None
                      else self.cl)
        self.has_scale = scale is not None
        self.b, self.L, self.h, self.d, self.n = b, L, h, d, B.shape[-1]
        self.tiles = triton.cdiv(L, self.block)
        self.qk_scale = float(softmax_scale) * LOG2E
        self.heads_per = (h // k.shape[2], h // B.shape[2], h // C.shape[2])
        self.qk_precision = _precision(qk_dtype)
        self.cb_precision = _precision(bc_dtype)

    def common_args(self):
        """The arguments the rows and columns kernels share, in their order."""
        return (
            self.L, self.h, self.tiles, *self.heads_per,
            *_strides(self.q), *_strides(self.k), *_strides(self.C), *_strides(self.B),
        )

    def launch_options(self):
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def _softmax_lse(x: _Inputs) -> Tensor:
    lse = torch.empty(x.b, x.h, x.L, device=x.q.device, dtype=torch.float32)
    _softmax_lse_kernel[(x.tiles, x.b * x.h)](
        x.q, x.k, lse, x.L, x.h, x.tiles, x.heads_per[0], *_strides(x.q), *_strides(x.k), x.qk_scale,
        HEAD_DIM=x.d, BLOCK=x.block, QK_PRECISION=x.qk_precision, **x.launch_options(),
    )
    return lse


def _rows(x: _Inputs, lse: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """sq (b, h, L): each row's sum of (A - M)^2; with grad also rowr (b, h, L) and dc (b, L, h, n) float32."""
    device = x.q.device
    sq = torch.empty(x.b, x.h, x.L, device=device, dtype=torch.float32)
    rowr = torch.empty_like(sq) if with_grad else sq  # unused pointers when not with_grad
    dc = torch.empty(x.b, x.L, x.h, x.n, device=device, dtype=torch.float32) if with_grad else sq[..., None]
    _stage1_rows_kernel[(x.tiles, x.b * x.h)](
        x.q, x.k, x.C, x.B, lse, x.cl, x.start, x.scale, sq, rowr, dc,
        *x.common_args(), *_strides(dc), x.qk_scale,
        HEAD_DIM=x.d, STATE_DIM=x.n, BLOCK=x.block, HAS_SCALE=x.has_scale, WITH_GRAD=with_grad,
        QK_PRECISION=x.qk_precision, CB_PRECISION=x.cb_precision, **x.launch_options(),
    )
    return sq, (rowr if with_grad else None), (dc if with_grad else None)


def _cols(x: _Inputs, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """db (b, L, h, n) = scale_j v_j, ds (b, h, L) = B_j . v_j, colr (b, h, L); all float32."""
    device = x.q.device
    db = torch.empty(x.b, x.L, x.h, x.n, device=device, dtype=torch.float32)
    ds = torch.empty(x.b, x.h, x.L, device=device, dtype=torch.float32)
    colr = torch.empty_like(ds)
    _stage1_cols_kernel[(x.tiles, x.b * x.h)](
        x.q, x.k, x.C, x.B, lse, x.cl, x.start, x.scale, db, ds, colr,
        *x.common_args(), *_strides(db), x.qk_scale,
        HEAD_DIM=x.d, STATE_DIM=x.n, BLOCK=x.block, HAS_SCALE=x.has_scale,
        QK_PRECISION=x.qk_precision, CB_PRECISION=x.cb_precision, **x.launch_options(),
    )
    return db, ds, colr


def _head_sums(sq: Tensor) -> Tensor:
    """S (b, h) float64 from the per-row sums."""
    return sq.sum(-1, dtype=torch.float64)


def _loss(S: Tensor) -> Tensor:
    return S.sqrt().mean().to(torch.float32)


def _group_sum(per_head: Tensor, groups: int) -> Tensor:
    """(b, L, h, n) -> (b, L, groups, n): sum over the heads that share a group."""
    b, L, h, n = per_head.shape
    return per_head if groups == h else per_head.view(b, L, groups, h // groups, n).sum(3)


class _Stage1Loss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, softmax_scale, log_a, B, C, scale, config):
        x = _Inputs(q, k, softmax_scale, log_a, B, C, scale, config)
        lse = _softmax_lse(x)
        sq, rowr, dc = _rows(x, lse, with_grad=True)
        S = _head_sums(sq)
        ctx.x = x
        ctx.dtypes = (log_a.dtype, B.dtype, C.dtype, None if scale is None else scale.dtype)
        ctx.groups = (B.shape[2], C.shape[2])
        ctx.save_for_backward(lse, S, rowr, dc)
        return _loss(S)

    @staticmethod
    def backward(ctx, grad):
        lse, S, rowr, dc = ctx.saved_tensors
        x: _Inputs = ctx.x
        log_a_dtype, B_dtype, C_dtype, scale_dtype = ctx.dtypes
        gb, gc = ctx.groups
        db, ds, colr = _cols(x, lse)
        # loss = mean sqrt(S): dloss/dS = 1 / (2 sqrt(S) b h); times the -2 of dS/dM. Zero where S = 0,
        # as torch.linalg.matrix_norm's backward does.
        coef = torch.where(S > 0, -grad.double() / (S.sqrt() * x.b * x.h), 0.0).float()  # (b, h)
        per_head = coef[:, None, :, None]
        dC = _group_sum(dc * per_head, gc).to(C_dtype)
        dB = _group_sum(db * per_head, gb).to(B_dtype)
        dscale = None if scale_dtype is None else (ds * coef[..., None]).transpose(1, 2).to(scale_dtype)
        dcum = (rowr - colr).double() * coef[..., None]  # dloss/dc_k, c = cumsum(log_a): (b, h, L)
        dlog_a = dcum.flip(-1).cumsum(-1).flip(-1).transpose(1, 2).to(log_a_dtype)
        return None, None, None, dlog_a, dB, dC, dscale, None


def _check_inputs(q: Tensor, k: Tensor, log_a: Tensor, B: Tensor, C: Tensor, scale: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must have shape (b, L, h, d), got {tuple(q.shape)}")
    b, L, h, d = q.shape
    if k.dim() != 4 or k.shape[:2] != (b, L) or k.shape[3] != d or h % k.shape[2] != 0:
        raise ValueError(f"k must have shape (b, L, hk, d) = ({b}, {L}, hk, {d}) with h % hk == 0, "
                         f"got {tuple(k.shape)}")
    if tuple(log_a.shape) != (b, L, h):
        raise ValueError(f"log_a must have shape (b, L, h) = {(b, L, h)} to match q, got {tuple(log_a.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, L) or h % B.shape[2] != 0:
        raise ValueError(f"B must have shape (b, L, gb, n) = ({b}, {L}, gb, n) with h % gb == 0, "
                         f"got {tuple(B.shape)}")
    n = B.shape[3]
    if C.dim() != 4 or C.shape[:2] != (b, L) or C.shape[3] != n or h % C.shape[2] != 0:
        raise ValueError(f"C must have shape (b, L, gc, n) = ({b}, {L}, gc, {n}) with h % gc == 0, "
                         f"got {tuple(C.shape)}")
    if scale is not None and tuple(scale.shape) != (b, L, h):
        raise ValueError(f"scale must have shape (b, L, h) = {(b, L, h)}, got {tuple(scale.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"stage1_loss_triton needs the head dim d to be a power of two >= 16, got {d}")
    if n < 1:
        raise ValueError("stage1_loss_triton needs a state dim n >= 1")
    if L == 0:
        raise ValueError("stage1_loss_triton needs L >= 1")


def stage1_loss_triton(
    q: Tensor,
    k: Tensor,
    softmax_scale: float,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
    *,
    config: tuple[int, int, int] | None = None,
) -> Tensor:
    """MOHAWK stage-1 loss, fused: mean over (batch, head) of || softmax(q k^T s + mask) - M_SSD ||_F.

    Same arguments and value as `reference.stage1_loss`: q (b, L, h, d) and k (b, L, hk, d) after RoPE (GQA:
    h % hk == 0); log_a (b, L, h) <= 0; B (b, L, gb, n); C (b, L, gc, n); scale (b, L, h) or None. Tensors in
    float16, bfloat16 or float32 on a CUDA device (or on the CPU under TRITON_INTERPRET=1); d a power of two
    >= 16 (n is padded to one with zeros). Returns a float32 scalar. Gradients flow to log_a, B, C and scale; q and
    k are the frozen teacher's and are detached. Memory is O(L): nothing of size L x L is ever stored.
    `config` = (BLOCK, num_warps, num_stages) overrides the tile choice (tests and benchmarks).
    """
    _check_inputs(q, k, log_a, B, C, scale)
    n = B.shape[-1]
    width = max(16, triton.next_power_of_2(n))
    if width != n:
        # The kernels' tiles span the state dim whole, a power of two >= 16: zero columns add nothing to C.B, and
        # F.pad's backward drops their gradients (a student.d_state such as 96).
        B, C = F.pad(B, (0, width - n)), F.pad(C, (0, width - n))
    config = config or _default_config()
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (log_a, B, C, scale)
    )
    if wants_grad:
        return _Stage1Loss.apply(q.detach(), k.detach(), softmax_scale, log_a, B, C, scale, config)
    x = _Inputs(q, k, softmax_scale, log_a, B, C, scale, config)
    sq, _, _ = _rows(x, _softmax_lse(x), with_grad=False)
    return _loss(_head_sums(sq))
