"""Triton kernels for decoding one token: the SSD state update, and the short conv fused in front of it.

    y, new_state = ssd_step_triton(state, x, log_a, B, C, scale=None, D=None)          # = reference.ssd_step
    y, new_conv_state, new_state = conv_ssd_step_triton(conv_state, xbc, weight, bias, state, log_a, ...)

Decoding is memory bound (each state element is read once and written once) and, at small batch, launch bound; one
program owns one (batch, head, block of p) tile of the state, and the fused kernel also runs the depthwise conv and
its activation for the channels that tile needs, so a token costs one launch instead of about ten. Both kernels can
write the new SSD state over the old one (`out_state=state`): each state element is read and written by one program.

Only relative imports here: this file is copied beside an exported model's code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ssd_step_triton", "conv_ssd_step_triton"]


@triton.jit
def _state_update(
    state_ptr, out_state_ptr, x, log_a, s, Bv, Cv, d, offs_p, offs_n, mask_p, mask_n, sst_p, sout_p,
    HAS_D: tl.constexpr,
):
    """new_state = exp(log_a) state + s outer(x, B), stored; returns y = new_state C (+ D x) for this p block."""
    mask = mask_p[:, None] & mask_n[None, :]
    state = tl.load(state_ptr + offs_p[:, None] * sst_p + offs_n[None, :], mask=mask, other=0.0)
    new_state = state.to(x.dtype) * tl.exp(log_a) + (x * s)[:, None] * Bv[None, :]
    tl.store(
        out_state_ptr + offs_p[:, None] * sout_p + offs_n[None, :], new_state.to(out_state_ptr.dtype.element_ty),
        mask=mask,
    )
    y = tl.sum(new_state * Cv[None, :], 1)
    if HAS_D:
        y += d * x
    return y


@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, log_a_ptr, b_ptr, c_ptr, scale_ptr, d_ptr, y_ptr, out_state_ptr,
    nheads, heads_per_b, heads_per_c, dim_p, dim_n,
    sst_b, sst_h, sst_p,
    sx_b, sx_h,
    sla_b, sla_h,
    sb_b, sb_g,
    sc_b, sc_g,
    ss_b, ss_h,
    sy_b, sy_h,
    sout_b, sout_h, sout_p,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    bi = (pid_bh // nheads).to(tl.int64)
    hi = pid_bh % nheads
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < dim_p
    mask_n = offs_n < dim_n

    x = tl.load(x_ptr + bi * sx_b + hi * sx_h + offs_p, mask=mask_p, other=0.0).to(ACC)
    log_a = tl.load(log_a_ptr + bi * sla_b + hi * sla_h).to(ACC)
    s = tl.load(scale_ptr + bi * ss_b + hi * ss_h).to(ACC) if HAS_SCALE else 1.0
    d = tl.load(d_ptr + hi).to(ACC) if HAS_D else 0.0
    Bv = tl.load(b_ptr + bi * sb_b + (hi // heads_per_b) * sb_g + offs_n, mask=mask_n, other=0.0).to(ACC)
    Cv = tl.load(c_ptr + bi * sc_b + (hi // heads_per_c) * sc_g + offs_n, mask=mask_n, other=0.0).to(ACC)
    y = _state_update(
        state_ptr + bi * sst_b + hi * sst_h, out_state_ptr + bi * sout_b + hi * sout_h,
        x, log_a, s, Bv, Cv, d, offs_p, offs_n, mask_p, mask_n, sst_p, sout_p, HAS_D,
    )
    tl.store(y_ptr + bi * sy_b + hi * sy_h + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _conv_channels(
    conv_state_ptr, xbc_ptr, w_ptr, bias_ptr, out_conv_ptr, channels, mask, write,
    scs_c, scs_k, sw_c, sout_c, sout_k,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
):
    """One conv step for `channels`: window = [state, input], out = window . weight (+ bias), SiLU if asked.

    Stores the window's last K - 1 entries as the new conv state when `write` (one writer per channel).
    """
    offs_k = tl.arange(0, BLOCK_K)
    in_state = offs_k < K - 1
    past = tl.load(
        conv_state_ptr + channels[:, None] * scs_c + offs_k[None, :] * scs_k,
        mask=mask[:, None] & in_state[None, :], other=0.0,
    ).to(ACC)
    current = tl.load(xbc_ptr + channels, mask=mask, other=0.0).to(ACC)
    window = tl.where(offs_k[None, :] == K - 1, current[:, None], past)
    w = tl.load(
        w_ptr + channels[:, None] * sw_c + offs_k[None, :], mask=mask[:, None] & (offs_k < K)[None, :], other=0.0
    )
    out = tl.sum(window * w.to(ACC), 1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + channels, mask=mask, other=0.0).to(ACC)
    if SILU:
        out = out * tl.sigmoid(out)
    if write:
        keep = (offs_k >= 1) & (offs_k < K)
        tl.store(
            out_conv_ptr + channels[:, None] * sout_c + (offs_k[None, :] - 1) * sout_k,
            window.to(out_conv_ptr.dtype.element_ty), mask=mask[:, None] & keep[None, :],
        )
    return out


@triton.jit
def _conv_ssd_step_kernel(
    conv_state_ptr, xbc_ptr, w_ptr, bias_ptr, state_ptr, log_a_ptr, scale_ptr, d_ptr,
    y_ptr, out_conv_ptr, out_state_ptr,
    nheads, heads_per_b, heads_per_c, groups_b, dim_p, dim_n,
    scs_b, scs_c, scs_k,
    sxbc_b, sw_c,
    sout_conv_b, sout_conv_c, sout_conv_k,
    sst_b, sst_h, sst_p,
    sla_b, sla_h,
    ss_b, ss_h,
    sy_b, sy_h,
    sout_b, sout_h, sout_p,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_D: tl.constexpr, ACC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    bi = (pid_bh // nheads).to(tl.int64)
    hi = pid_bh % nheads
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < dim_p
    mask_n = offs_n < dim_n
    conv_state_ptr += bi * scs_b
    xbc_ptr += bi * sxbc_b
    out_conv_ptr += bi * sout_conv_b

    # Channels of xbc = [x (h*p) | B (gb*n) | C (gc*n)]; this program needs its x block and its head's B and C.
    # Every head of a group reads the group's B and C; the first head's first p block writes their conv state.
    group_b = hi // heads_per_b
    group_c = hi // heads_per_c
    x_channels = hi * dim_p + offs_p
    b_channels = nheads * dim_p + group_b * dim_n + offs_n
    c_channels = nheads * dim_p + groups_b * dim_n + group_c * dim_n + offs_n
    first_p = pid_p == 0
    x = _conv_channels(
        conv_state_ptr, xbc_ptr, w_ptr, bias_ptr, out_conv_ptr, x_channels, mask_p, True,
        scs_c, scs_k, sw_c, sout_conv_c, sout_conv_k, K, BLOCK_K, HAS_BIAS, SILU, ACC,
    )
    Bv = _conv_channels(
        conv_state_ptr, xbc_ptr, w_ptr, bias_ptr, out_conv_ptr, b_channels, mask_n,
        first_p & (hi % heads_per_b == 0),
        scs_c, scs_k, sw_c, sout_conv_c, sout_conv_k, K, BLOCK_K, HAS_BIAS, SILU, ACC,
    )
    Cv = _conv_channels(
        conv_state_ptr, xbc_ptr, w_ptr, bias_ptr, out_conv_ptr, c_channels, mask_n,
        first_p & (hi % heads_per_c == 0),
        scs_c, scs_k, sw_c, sout_conv_c, sout_conv_k, K, BLOCK_K, HAS_BIAS, SILU, ACC,
    )

    log_a = tl.load(log_a_ptr + bi * sla_b + hi * sla_h).to(ACC)
    s = tl.load(scale_ptr + bi * ss_b + hi * ss_h).to(ACC) if HAS_SCALE else 1.0
    d = tl.load(d_ptr + hi).to(ACC) if HAS_D else 0.0
    y = _state_update(
        state_ptr + bi * sst_b + hi * sst_h, out_state_ptr + bi * sout_b + hi * sout_h,
        x, log_a, s, Bv, Cv, d, offs_p, offs_n, mask_p, mask_n, sst_p, sout_p, HAS_D,
    )
    tl.store(y_ptr + bi * sy_b + hi * sy_h + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _launch_config(batch_heads: int, dim_p: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps): 8-row p blocks for a single sequence's heads (more programs in flight), 32 beyond.

    Chosen from a sweep on an H100 (h = 32, p = n = 64, bf16; CUDA-graph replay): at batch 1, (8, 4) took 1.84 us
    where (16, 4) took 2.12; from batch 4 on, (32, 4) was the fastest or within 2% of it (bench/RESULTS.md).
    """
    block = 8 if batch_heads <= 32 else 32
    return min(block, triton.next_power_of_2(dim_p)), 4


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_step_inputs(state: Tensor, x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, scale, D) -> None:
    if state.dim() != 4:
        raise ValueError(f"state must have shape (b, h, p, n), got {tuple(state.shape)}")
    b, h, p, n = state.shape
    if tuple(x.shape) != (b, h, p):
        raise ValueError(f"x must have shape (b, h, p) = {(b, h, p)}, got {tuple(x.shape)}")
    if tuple(log_a.shape) != (b, h):
        raise ValueError(f"log_a must have shape (b, h) = {(b, h)}, got {tuple(log_a.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 3 or t.shape[0] != b or t.shape[2] != n or t.shape[1] < 1 or h % t.shape[1] != 0:
            raise ValueError(
                f"{name} must have shape (b, g, n) = ({b}, g, {n}) with g dividing h={h}, got {tuple(t.shape)}"
            )
    if scale is not None and tuple(scale.shape) != (b, h):
        raise ValueError(f"scale must have shape (b, h) = {(b, h)}, got {tuple(scale.shape)}")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"D must have shape (h,) = ({h},), got {tuple(D.shape)}")


def _new_state(state: Tensor, out_state: Tensor | None) -> Tensor:
    if out_state is None:
        return torch.empty_like(state, memory_format=torch.contiguous_format)
    if out_state.shape != state.shape or out_state.stride(-1) != 1:
        raise ValueError("out_state must have the state's shape and a contiguous last dimension")
    return out_state


def ssd_step_triton(
    state: Tensor,
    x: Tensor,
    log_a: Tensor,
    B: Tensor,
    C: Tensor,
    scale: Tensor | None = None,
    D: Tensor | None = None,
    *,
    out_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the SSD recurrence; same contract as reference.ssd_step (no autograd: decoding only).

    state (b, h, p, n); x (b, h, p); log_a (b, h); B (b, gb, n); C (b, gc, n); scale (b, h) | None; D (h,) | None.
    Returns y (b, h, p) in x's dtype and the new state in state's dtype; pass out_state=state to update in place.
    """
    _check_step_inputs(state, x, log_a, B, C, scale, D)
    b, h, p, n = state.shape
    state, x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (state, x, B, C))
    new_state = _new_state(state, out_state)
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    s = scale if scale is not None else log_a
    block_p, num_warps = _launch_config(b * h, p)
    _ssd_step_kernel[(b * h, triton.cdiv(p, block_p))](
        state, x, log_a, B, C, s, D if D is not None else log_a, y, new_state,
        h, h // B.shape[1], h // C.shape[1], p, n,
        state.stride(0), state.stride(1), state.stride(2),
        x.stride(0), x.stride(1),
        log_a.stride(0), log_a.stride(1),
        B.stride(0), B.stride(1),
        C.stride(0), C.stride(1),
        s.stride(0), s.stride(1),
        y.stride(0), y.stride(1),
        new_state.stride(0), new_state.stride(1), new_state.stride(2),
        BLOCK_P=block_p, BLOCK_N=max(16, triton.next_power_of_2(n)),
        HAS_SCALE=scale is not None, HAS_D=D is not None, ACC=_acc_dtype(torch.promote_types(x.dtype, state.dtype)),
        num_warps=num_warps,
    )
    return y, new_state


def conv_ssd_step_triton(
    conv_state: Tensor,
    xbc: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    state: Tensor,
    log_a: Tensor,
    scale: Tensor | None = None,
    D: Tensor | None = None,
    *,
    groups_b: int,
    groups_c: int,
    activation: str | None = "silu",
    out_state: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token through the depthwise short conv, its activation and the SSD step, in one launch.

    conv_state (b, c, k-1) and xbc (b, c) hold the channels [x (h*p) | B (groups_b*n) | C (groups_c*n)] (Mamba-2's
    xBC order); weight (c, k); bias (c,) | None; state (b, h, p, n); log_a, scale (b, h); D (h,) | None.
    Equals: u, new_conv_state = reference.causal_conv1d_step(conv_state, xbc, weight, bias); u = silu(u) (or not,
    activation=None); split u into x, B, C; y, new_state = reference.ssd_step(state, x, log_a, B, C, scale, D).
    Returns (y (b, h, p), new_conv_state (b, c, k-1), new_state); out_state=state updates the SSD state in place
    (the conv state is always written anew: heads that share B and C read its old values).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if state.dim() != 4:
        raise ValueError(f"state must have shape (b, h, p, n), got {tuple(state.shape)}")
    b, h, p, n = state.shape
    channels = h * p + (groups_b + groups_c) * n
    if xbc.dim() != 2 or tuple(xbc.shape) != (b, channels):
        raise ValueError(
            f"xbc must have shape (b, h*p + (groups_b + groups_c)*n) = {(b, channels)}, got {tuple(xbc.shape)}"
        )
    if weight.dim() != 2 or weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (c, k) = ({channels}, k), got {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(conv_state.shape) != (b, channels, k - 1):
        raise ValueError(
            f"conv_state must have shape (b, c, k-1) = {(b, channels, k - 1)}, got {tuple(conv_state.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must have shape (c,) = ({channels},), got {tuple(bias.shape)}")
    for name, groups in (("groups_b", groups_b), ("groups_c", groups_c)):
        if groups < 1 or h % groups != 0:
            raise ValueError(f"{name}={groups} must divide the number of heads h={h}")
    if tuple(log_a.shape) != (b, h) or (scale is not None and tuple(scale.shape) != (b, h)):
        raise ValueError(f"log_a and scale must have shape (b, h) = {(b, h)}")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"D must have shape (h,) = ({h},), got {tuple(D.shape)}")

    xbc, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (xbc, weight))
    state = state if state.stride(-1) == 1 else state.contiguous()
    new_state = _new_state(state, out_state)
    new_conv = torch.empty(b, channels, k - 1, device=xbc.device, dtype=conv_state.dtype)
    y = torch.empty(b, h, p, device=xbc.device, dtype=xbc.dtype)
    s = scale if scale is not None else log_a
    block_p, num_warps = _launch_config(b * h, p)
    _conv_ssd_step_kernel[(b * h, triton.cdiv(p, block_p))](
        conv_state, xbc, weight, bias if bias is not None else weight, state, log_a, s,
        D if D is not None else log_a, y, new_conv, new_state,
        h, h // groups_b, h // groups_c, groups_b, p, n,
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        xbc.stride(0), weight.stride(0),
        new_conv.stride(0), new_conv.stride(1), new_conv.stride(2),
        state.stride(0), state.stride(1), state.stride(2),
        log_a.stride(0), log_a.stride(1),
        s.stride(0), s.stride(1),
        y.stride(0), y.stride(1),
        new_state.stride(0), new_state.stride(1), new_state.stride(2),
        K=k, BLOCK_K=max(2, triton.next_power_of_2(k)), BLOCK_P=block_p, BLOCK_N=max(16, triton.next_power_of_2(n)),
        HAS_BIAS=bias is not None, SILU=activation == "silu", HAS_SCALE=scale is not None, HAS_D=D is not None,
        ACC=_acc_dtype(torch.promote_types(xbc.dtype, state.dtype)),
        num_warps=num_warps,
    )
    return y, new_conv, new_state
