"""Fused SwiGLU gate, silu(gate) * up (the gated MLP the student keeps from a Llama-family teacher), in Triton.

Same function as `reference.swiglu`. Why a kernel: eagerly it is two passes forward (silu, product) that also keep
silu(gate) alive for the backward (one more (tokens x 4·width) activation per layer), and three backward; here one
pass each way, keeping only the two inputs, with the backward recomputing silu and its derivative in registers.
The inputs may be column slices of wider tensors (rows of any stride; in the SSD mixer the gate z is a slice of
in_proj's output), read where they lie. Arithmetic in float32; outputs in the inputs' (promoted) dtype.

Only relative imports in this folder: `distill export` copies these files beside an exported model's modeling code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, W, sg, su, BLOCK: tl.constexpr):
    # Element offs of the (rows x W) problem lies at row * stride + column in each input; the output is contiguous.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // W, offs % W
    g = tl.load(g_ptr + row * sg + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + col, mask=mask, other=0.0).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, W, sg, su, sdh, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // W, offs % W
    g = tl.load(g_ptr + row * sg + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + col, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * sdh + col, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    # d silu(g) / dg = s * (1 + g * (1 - s))
    tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * g * s).to(du_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, width) with unit column stride: a view where the strides allow (a column slice), else a copy."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)
    return t2 if t2.stride(1) == 1 or t2.shape[1] == 1 else t2.contiguous()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = _rows(gate), _rows(up)
        h = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n, W = g2.numel(), g2.shape[1]
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g2, u2, h, n, W, g2.stride(0), u2.stride(0), BLOCK=BLOCK)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return h

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        dh2 = _rows(dh)
        dg = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        du = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
        n, W = g2.numel(), g2.shape[1]
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            g2, u2, dh2, dg, du, n, W, g2.stride(0), u2.stride(0), dh2.stride(0), BLOCK=BLOCK,
        )
        return dg.reshape(ctx.shape), du.reshape(ctx.shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """reference.swiglu on the GPU: gate and up of one shape."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.numel() == 0:
        return gate * up
    return _SwiGLU.apply(gate, up)
