"""Fused RMSNorm (the Llama family's, which the student keeps from its teacher) in Triton: forward and backward.

Same function as `reference.rms_norm`: y = weight * round(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) per row, the
normalized x rounded to x's dtype before the product (as the family computes it), y in the dtype of weight * x or in
`out_dtype` (a bf16 y for the bf16 products that follow under autocast: written once in bf16 instead of written in
float32 and then cast by each consumer, and its gradient arrives in bf16 with no cast back).

Why a kernel: eagerly the norm is six elementwise kernels forward (cast, square, mean, rsqrt, two products) and about
ten backward, each a pass over the (tokens x width) activation; a stage-3 step of SmolLM2-135M's student runs 61 of
them with gradients (and the teacher 61 more without), and such passes were most of the step's ~150 ms of
elementwise kernels in the H200 profile of 2026-12-01. Here the forward is one pass that also keeps rstd (4 bytes a
row) for the backward, and the backward one pass that writes dx and, per program, a partial sum of dweight over the
rows it walked (summed afterwards: deterministic, no atomics). Arithmetic in float32.

Only relative imports in this folder: `distill export` copies these files beside an exported model's modeling code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    N, D, sx, sy, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    r_ok, c_ok = rows < N, cols < D
    mask = r_ok[:, None] & c_ok[None, :]
    rows64 = rows.to(tl.int64)  # 64-bit: tokens x width passes 2^31 at long contexts and large batches
    xv = tl.load(x_ptr + rows64[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    xf = xv.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)
    normed = (xf * rstd[:, None]).to(xv.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * sy + cols[None, :], (w[None, :] * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=r_ok)


@triton.jit
def _rms_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    N, D, sx, sdy, sdx, rows_per_program,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Each program walks rows [begin, end) in blocks of BLOCK_R and keeps its share of dweight in registers.
    pid = tl.program_id(0)
    begin = pid * rows_per_program
    end = tl.minimum(begin + rows_per_program, N)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(begin, end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        r_ok = rows < end
        mask = r_ok[:, None] & c_ok[None, :]
        rows64 = rows.to(tl.int64)
        xv = tl.load(x_ptr + rows64[:, None] * sx + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        normed = xv.to(tl.float32) * rstd[:, None]
        dw += tl.sum(dy * normed.to(xv.dtype).to(tl.float32), axis=0)
        # d normed = dy * w; dx = rstd * (d normed - normed * mean(d normed * normed)) (the rounding taken as identity)
        dn = dy * w[None, :]
        dx = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, axis=1) / D)[:, None])
        tl.store(dx_ptr + rows64[:, None] * sdx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=c_ok)


def _blocks(D: int) -> tuple[int, int]:
    """(rows, columns) of a tile: the whole row in one block, about 4K elements a tile."""
    block_d = triton.next_power_of_2(D)
    return max(1, min(16, 4096 // block_d)), block_d


def _programs(x: torch.Tensor, n_blocks: int) -> int:
    """How many programs the backward spreads its row blocks over: a few per SM (each owns a dweight partial)."""
    if x.is_cuda:
        return min(n_blocks, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(n_blocks, 4)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        N = x2.shape[0]
        y = torch.empty((N, D), dtype=out_dtype or torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
        block_r, block_d = _blocks(D)
        _rms_fwd_kernel[(triton.cdiv(N, block_r),)](
            x2, weight, y, rstd, N, D, x2.stride(0), y.stride(0), eps, BLOCK_R=block_r, BLOCK_D=block_d,
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, D = x2.shape
        dy2 = dy.reshape(-1, D)
        if dy2.stride(1) != 1:
            dy2 = dy2.contiguous()
        block_r, block_d = _blocks(D)
        n_prog = _programs(x2, triton.cdiv(N, block_r))
        rows_per_program = triton.cdiv(triton.cdiv(N, n_prog), block_r) * block_r
        n_prog = triton.cdiv(N, rows_per_program)
        dx = torch.empty((N, D), dtype=x2.dtype, device=x2.device)
        dw_part = torch.empty((n_prog, D), dtype=torch.float32, device=x2.device)
        _rms_bwd_kernel[(n_prog,)](
            x2, weight, dy2, rstd, dx, dw_part, N, D, x2.stride(0), dy2.stride(0), dx.stride(0), rows_per_program,
            BLOCK_R=block_r, BLOCK_D=block_d,
        )
        return dx.reshape(ctx.shape), dw_part.sum(0).to(weight.dtype), None, None


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """reference.rms_norm on the GPU: x (..., d), weight (d,); y in `out_dtype` where given."""
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape (d,) = ({x.shape[-1] if x.dim() else '?'},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if x.numel() == 0:
        y = weight * x
        return y if out_dtype is None else y.to(out_dtype)
    return _RMSNorm.apply(x, weight, float(eps), out_dtype)
