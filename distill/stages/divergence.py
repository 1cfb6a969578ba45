"""Stage 3's divergences between teacher and student next-token distributions, computed without ever building the
(tokens x vocabulary) logits whole.

`divergence_reference` is the definition, on full logits (float64 in tests). `fused_linear_divergence` computes the
same loss from the final hidden states and the LM heads, a chunk of tokens at a time: each chunk's logits are
built, the loss and its gradient with respect to that chunk's student logits are taken (`distill.kernels.
chunk_divergence`: a Triton kernel on CUDA for every divergence below, else the PyTorch reference, whose math is
the one `divergence_reference` uses), the gradient is pushed through the student's LM head at once, and the chunk's
logits are dropped. What stays is the gradient for the student's hidden states (tokens x hidden) and LM head, so peak memory is
O(chunk x vocabulary) instead of O(tokens x vocabulary) for each of teacher logits, student logits and their grads.

Divergences, per token, at temperature T (p_t = softmax(teacher / T), p_s = softmax(student / T)):
  forward_kl  KL(p_t || p_s), mean-seeking (Hinton et al.; MOHAWK's stage 3)
  reverse_kl  KL(p_s || p_t), mode-seeking
  jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, 0 < beta < 1 (the
              generalized JSD of GKD; beta = 0.5 is the symmetric Jensen-Shannon divergence). At beta -> 0 and 1 it
              vanishes; scaled by 1 / (beta (1 - beta)) it tends to forward and reverse KL, which are given by name.
The loss is T^2 times the mean divergence over tokens (so gradients keep their size across temperatures), plus
ce_weight times the mean cross-entropy of the student's (T = 1) logits on the true next tokens.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.reference import DIVERGENCES, chunk_sums


def divergence_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stage-3 loss on full logits (..., V), computed in the logits' dtype promoted to at least float32;
    `weights` (...,), one per token, scale each token's divergence (the mean over tokens stays a plain mean)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype).flatten(0, -2)
    t = teacher_logits.to(dtype).flatten(0, -2)
    use_ce = bool(ce_weight) and labels is not None
    flat_weights = weights.flatten() if weights is not None else None
    div, ce = chunk_sums(s, t, labels.flatten() if use_ce else None, divergence, beta, temperature, flat_weights)
    n = s.shape[0]
    parts = {divergence: div / n * temperature**2}
    loss = parts[divergence]
    if use_ce:
        parts["ce"] = ce / n
        loss = loss + ce_weight * parts["ce"]
    return loss, parts


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """hidden (n, H) @ weight (V, H)^T (+ bias) with the matmul in `dtype` (its output kept in that dtype: the
    divergence upcasts as it reads; with a bias, float32)."""
    out = torch.matmul(hidden.to(dtype), weight.to(dtype).t())
    return out.float() + bias.float() if bias is not None else out


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, weights, options):
        divergence, beta, temperature, ce_weight, chunk, dtype = options
        n = s_hidden.shape[0]
        want_w = s_weight.requires_grad
        want_b = s_bias is not None and s_bias.requires_grad
        grad_h = torch.empty(s_hidden.shape, dtype=torch.float32, device=s_hidden.device)
        grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if want_w else None
        grad_b = torch.zeros(s_bias.shape, dtype=torch.float32, device=s_bias.device) if want_b else None
        div_total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            h = s_hidden[rows]
            with torch.no_grad():
                t_logits = head_logits(t_hidden[rows], t_weight, t_bias, dtype)
                s_logits = head_logits(h, s_weight, s_bias, dtype)
            div, ce, g = kernels.chunk_divergence(
                s_logits, t_logits, divergence, beta, temperature, kl_scale=temperature**2 / n,
                labels=labels[rows] if labels is not None else None, ce_scale=ce_weight / n, grad_dtype=dtype,
                weights=weights[rows] if weights is not None else None,
            )
            del s_logits, t_logits
            div_total += div
            if ce is not None:
                ce_total += ce
            grad_h[rows] = torch.matmul(g, s_weight.to(dtype)).float()
            if want_w:
                grad_w += torch.matmul(g.t(), h.to(dtype)).float()
            if want_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, s_bias.dtype if s_bias is not None else None)
        div_mean = div_total * (temperature**2 / n)
        ce_mean = ce_total / n
        loss = div_mean + ce_weight * ce_mean if labels is not None else div_mean.clone()  # not the marked tensor
        ctx.mark_non_differentiable(div_mean, ce_mean)
        return loss, div_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_ce):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        scale = grad_loss.float()
        dh = (grad_h * scale).to(h_dtype)
        dw = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        db = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None, None, None, None


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Linear,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    chunk_tokens: int = 1024,
    matmul_dtype: torch.dtype = torch.float32,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stage-3 loss of `divergence_reference` on logits head(hidden), hidden states (n, H), in chunks;
    `weights` (n,): each token's divergence times its weight (recall weighting, distill/recall.py).

    Gradients flow to `student_hidden` and to the student head's weight and bias where they require grad. The LM-head
    matmuls run in `matmul_dtype` (bf16 under bf16 training); softmax, divergence and accumulation in float32.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is not one of {DIVERGENCES}")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student tokens but {teacher_hidden.shape[0]} teacher tokens")
    if weights is not None and tuple(weights.shape) != (student_hidden.shape[0],):
        raise ValueError(f"weights must have one entry per token ({student_hidden.shape[0]}), got "
                         f"{tuple(weights.shape)}")
    use_ce = bool(ce_weight) and labels is not None
    options = (divergence, beta, temperature, ce_weight, max(1, chunk_tokens), matmul_dtype)
    loss, div, ce = _FusedLinearDivergence.apply(
        student_hidden, student_head.weight, student_head.bias,
        teacher_hidden.detach(), teacher_head.weight.detach(),
        teacher_head.bias.detach() if teacher_head.bias is not None else None,
        labels if use_ce else None, weights.detach() if weights is not None else None, options,
    )
    parts = {divergence: div}
    if use_ce:
        parts["ce"] = ce
    return loss, parts
