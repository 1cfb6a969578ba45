"""The fused Triton stage-1 loss against the materialised float64 reference: the loss and every gradient.

With CUDA the kernels run on the GPU (bf16 and fp32 inputs). Without it they run on the CPU under
TRITON_INTERPRET=1 (set below, before triton is imported) at tiny shapes and 16 x 16 tiles, in float32, compared
with the float64 reference. Skipped cleanly when triton is not installed.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# Without CUDA, Triton's interpreter: @triton.jit (triton's own tl.zeros included) reads TRITON_INTERPRET when it
# decorates, so triton must be imported after it is set. conftest's imports (transformers) may have imported triton
# already: forget those modules (not the compiled triton._C) so that the import below starts afresh.
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    stale = [m for m in sys.modules if m == "triton" or m.startswith("triton.") and not m.startswith("triton._C")]
    for name in stale:
        del sys.modules[name]

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from distill.kernels import reference  # noqa: E402

triton_stage1 = importlib.import_module("distill.kernels.triton_stage1")
if not torch.cuda.is_available() and type(triton_stage1._stage1_rows_kernel).__name__ != "InterpretedFunction":
    triton_stage1 = importlib.reload(triton_stage1)  # imported before the interpreter was chosen
stage1_loss_triton = triton_stage1.stage1_loss_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(b, L, h, hk, gb, gc, d, n, mamba2=True, seed=0):
    """Random teacher q, k and student (log_a, B, C, scale) in float64 on DEVICE.

    Mamba-2 form: dt = softplus(raw + bias), log_a = -dt exp(A_log), scale = dt. Discrete form (mamba2=False):
    log_a = -softplus(raw), scale None. B and C are scaled so that M is of the size of the attention weights.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k = randn(b, L, h, d), randn(b, L, hk, d)
    B, C = randn(b, L, gb, n) / n**0.5, randn(b, L, gc, n) / n**0.5
    if mamba2:
        dt = F.softplus(randn(b, L, h) - 1.0)
        log_a, scale = -dt * torch.exp(randn(h)), dt
    else:
        log_a, scale = -F.softplus(randn(b, L, h)), None
    return [None if t is None else t.to(DEVICE) for t in (q, k, log_a, B, C, scale)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_against_reference(inputs, dtype, tol_loss, tol_grad, config=None):
    """Loss and gradients (log_a, B, C, scale) of ours in `dtype` vs the float64 reference on the same values."""
    q, k, log_a, B, C, scale = inputs
    softmax_scale = q.shape[-1] ** -0.5
    cast = [None if t is None else t.to(dtype) for t in (q, k, log_a, B, C, scale)]
    ours = [None if t is None else t.clone().requires_grad_() for t in cast[2:]]
    refs = [None if t is None else t.double().requires_grad_() for t in cast[2:]]

    ref_loss = reference.stage1_loss(cast[0].double(), cast[1].double(), softmax_scale, *refs)
    ref_loss.backward()
    loss = stage1_loss_triton(cast[0], cast[1], softmax_scale, *ours, config=config)
    loss.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= tol_loss * ref_loss.item(), (loss.item(), ref_loss.item())
    for name, ours_t, ref_t in zip(("log_a", "B", "C", "scale"), ours, refs):
        if ref_t is None:
            continue
        assert ours_t.grad is not None and ours_t.grad.dtype == ours_t.dtype, name
        assert torch.isfinite(ours_t.grad).all(), name
        err = rel_err(ours_t.grad, ref_t.grad)
        assert err <= tol_grad, f"d{name}: relative error {err:.2e} > {tol_grad:.0e}"

    with torch.no_grad():  # the forward-only path gives the same value
        again = stage1_loss_triton(cast[0], cast[1], softmax_scale, *cast[2:], config=config)
    assert abs(again.item() - loss.item()) <= 1e-6 * loss.item()


# Shapes: (b, L, h, hk, gb, gc, d, n, mamba2). Tiles are 16 wide in the interpreter, 64 on the GPU.
CPU_CASES = {
    "L<tile": (1, 10, 2, 2, 2, 2, 16, 16, True),
    "L%tile!=0,gqa,grouped_B": (1, 40, 4, 2, 2, 4, 16, 16, True),
    "discrete,batch,kv1,B1": (2, 37, 4, 1, 1, 2, 16, 16, False),
    "C_grouped,d!=n": (1, 33, 4, 4, 4, 1, 32, 16, True),
    "d<n,discrete": (1, 40, 4, 2, 2, 4, 16, 32, False),  # a state larger than the head (student.d_state)
    "n_not_pow2,padded": (1, 33, 4, 2, 2, 4, 16, 24, True),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter cases run without CUDA")
@pytest.mark.parametrize("case", CPU_CASES)
def test_matches_reference_interpreter(case):
    *shape, mamba2 = CPU_CASES[case]
    inputs = make_inputs(*shape, mamba2=mamba2, seed=len(case))
    check_against_reference(inputs, torch.float32, tol_loss=1e-5, tol_grad=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter cases run without CUDA")
def test_other_tile_and_strong_decay_interpreter():
    """32-wide tiles, L a multiple of them, decays strong enough that most of M underflows: still finite."""
    q, k, log_a, B, C, scale = make_inputs(1, 64, 2, 1, 2, 2, 16, 16, seed=7)
    check_against_reference((q, k, 20 * log_a, B, C, scale), torch.float32, 1e-5, 1e-4, config=(32, 1, 1))


GPU_CASES = {
    "bf16,L%64!=0,gqa,grouped": ((2, 300, 4, 2, 2, 4, 64, 64, True), torch.bfloat16, 1e-4, 1e-2),
    "bf16,discrete,L<64": ((1, 50, 4, 1, 1, 2, 64, 64, False), torch.bfloat16, 1e-4, 1e-2),
    "fp32,L=1000,gqa": ((1, 1000, 4, 2, 4, 1, 64, 64, True), torch.float32, 1e-5, 1e-4),
    "bf16,d<n,gqa": ((2, 300, 4, 2, 2, 4, 64, 128, True), torch.bfloat16, 1e-4, 1e-2),
    "fp32,n_not_pow2": ((1, 200, 4, 2, 2, 4, 64, 96, False), torch.float32, 1e-5, 1e-4),
}


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES)
def test_matches_reference_gpu(case):
    shape, dtype, tol_loss, tol_grad = GPU_CASES[case]
    *shape, mamba2 = shape
    inputs = make_inputs(*shape, mamba2=mamba2, seed=len(case))
    check_against_reference(inputs, dtype, tol_loss, tol_grad)


def test_teacher_inputs_get_no_gradient():
    """q and k are detached (the teacher is frozen); strided views of them are read correctly."""
    q, k, log_a, B, C, scale = [None if t is None else t.float() for t in make_inputs(1, 20, 2, 1, 1, 2, 16, 16)]
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (b, L, h, d), L stride != h*d
    loss = stage1_loss_triton(q_strided, k, 0.25, log_a, B.requires_grad_(), C, scale)
    loss.backward()
    assert q_strided.grad is None and B.grad is not None
    ref = reference.stage1_loss(q.double(), k.double(), 0.25, log_a.double(), B.double(), C.double(), scale.double())
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


def test_rejects_bad_inputs():
    q, k, log_a, B, C, scale = make_inputs(1, 8, 2, 1, 1, 1, 16, 16)
    with pytest.raises(TypeError, match="float64"):
        stage1_loss_triton(q, k, 0.25, log_a, B, C, scale)  # float64: the reference's job
    q, k, log_a, B, C, scale = [t.float() for t in (q, k, log_a, B, C, scale)]
    with pytest.raises(ValueError, match="log_a"):
        stage1_loss_triton(q, k, 0.25, log_a[:, :4], B, C, scale)
    with pytest.raises(ValueError, match="k must"):
        stage1_loss_triton(q, k[..., :8], 0.25, log_a, B, C, scale)
    with pytest.raises(ValueError, match="power of two"):
        stage1_loss_triton(q[..., :12], k[..., :12], 0.25, log_a, B, C, scale)
