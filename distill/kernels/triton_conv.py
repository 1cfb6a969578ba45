"""Fused depthwise causal convolution (the mixer's short conv over [x | B | C]) in Triton: forward and backward.

Same function as `reference.causal_conv1d` with no initial state: y_t[c] = bias[c] + sum_j w[c, j] u_{t-K+1+j}[c],
u = x preceded by zeros; returns (y, final_state), final_state (b, c, K-1) the last K-1 inputs.

Why a kernel: through `F.conv1d(groups=c)` the conv is a transpose and a concatenation (two copies of the input),
a grouped convolution with ~1,300 groups and, in the backward, a grouped weight gradient that reduces over batch x
length. Here each program reads a (BLOCK_L x BLOCK_C) tile of the input where it lies (any strides: in the mixer it
is a slice of in_proj's output), the K taps come from K shifted loads of the same tile (cached), and the backward
writes dx and per-tile partial sums of the weight and bias gradients (summed afterwards: deterministic, no atomics).
Arithmetic in float32; y and dx in x's dtype.

Only relative imports in this folder: `distill export` copies these files beside an exported model's modeling code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_L = 64
BLOCK_C = 64


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    L, C,
    sxb, sxl, sxc, syb, syl, syc,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b, pid_l, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_base = x_ptr + pid_b.to(tl.int64) * sxb  # 64-bit: batch x length x width passes 2^31 at large shapes
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        src = t - (K - 1) + j
        mask = ((src >= 0) & (src < L))[:, None] & c_ok[None, :]
        xv = tl.load(x_base + src[:, None] * sxl + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = (t < L)[:, None] & c_ok[None, :]
    tl.store(y_ptr + pid_b.to(tl.int64) * syb + t[:, None] * syl + c[None, :] * syc, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    L, C, n_l,
    sxb, sxl, sxc, sdyb, sdyl, sdyc, sdxb, sdxl, sdxc,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b, pid_l, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    t_ok = t < L
    tile = t_ok[:, None] & c_ok[None, :]
    dy_base = dy_ptr + pid_b.to(tl.int64) * sdyb
    x_base = x_ptr + pid_b.to(tl.int64) * sxb
    # dx_s = sum_j w_j dy_{s + K - 1 - j}: the transposed (anti-causal) conv of dy.
    dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        dst = t + (K - 1) - j
        mask = (dst < L)[:, None] & c_ok[None, :]
        dyv = tl.load(dy_base + dst[:, None] * sdyl + c[None, :] * sdyc, mask=mask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + c * K + j, mask=c_ok, other=0.0).to(tl.float32)
        dx += dyv * wv[None, :]
    tl.store(dx_ptr + pid_b.to(tl.int64) * sdxb + t[:, None] * sdxl + c[None, :] * sdxc, dx.to(dx_ptr.dtype.element_ty), mask=tile)
    # This tile's share of dw[c, j] = sum_t dy_t x_{t-K+1+j} and of db[c] = sum_t dy_t.
    dy = tl.load(dy_base + t[:, None] * sdyl + c[None, :] * sdyc, mask=tile, other=0.0).to(tl.float32)
    part = (pid_b * n_l + pid_l) * C
    for j in tl.static_range(K):
        src = t - (K - 1) + j
        mask = ((src >= 0) & t_ok)[:, None] & c_ok[None, :]
        xv = tl.load(x_base + src[:, None] * sxl + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        tl.store(dw_part_ptr + (part + c) * K + j, tl.sum(dy * xv, axis=0), mask=c_ok)
    if HAS_BIAS:
        tl.store(db_part_ptr + part + c, tl.sum(dy, axis=0), mask=c_ok)


def _grid(b: int, L: int, C: int):
    return (b, triton.cdiv(L, BLOCK_L), triton.cdiv(C, BLOCK_C))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        b, L, C = x.shape
        K = weight.shape[1]
        weight = weight.contiguous()
        y = torch.empty((b, L, C), dtype=x.dtype, device=x.device)
        _conv_fwd_kernel[_grid(b, L, C)](
            x, weight, bias if bias is not None else weight, y, L, C,
            *x.stride(), *y.stride(),
            K=K, HAS_BIAS=bias is not None, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C,
        )
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        b, L, C = x.shape
        K = weight.shape[1]
        grid = _grid(b, L, C)
        n_parts = grid[0] * grid[1]
        dx = torch.empty((b, L, C), dtype=x.dtype, device=x.device)
        dw_part = torch.empty((n_parts, C, K), dtype=torch.float32, device=x.device)
        has_bias = ctx.bias_dtype is not None
        db_part = torch.empty((n_parts, C), dtype=torch.float32, device=x.device) if has_bias else dw_part
        _conv_bwd_kernel[grid](
            x, weight, dy, dx, dw_part, db_part, L, C, grid[1],
            *x.stride(), *dy.stride(), *dx.stride(),
            K=K, HAS_BIAS=has_bias, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C,
        )
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(ctx.bias_dtype) if has_bias else None
        return dx, dw, db


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.causal_conv1d without an initial state (the training path and a cache's first prefill)."""
    if initial_state is not None:
        raise ValueError("causal_conv1d_triton takes no initial_state: continue a cached conv with the reference")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (b, L, c), got {tuple(x.shape)}")
    b, L, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (c, k) = ({C}, k) with k >= 1, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must have shape (c,) = ({C},), got {tuple(bias.shape)}")
    K = weight.shape[1]
    y = _CausalConv1d.apply(x, weight, bias)
    # The last K-1 inputs (zeros before the start), as reference.causal_conv1d returns them for a cache.
    tail = x[:, max(0, L - (K - 1)) :].detach().transpose(1, 2)
    final_state = torch.zeros((b, C, K - 1), dtype=x.dtype, device=x.device)
    if K > 1:
        final_state[:, :, K - 1 - tail.shape[2] :] = tail
    return y, final_state
