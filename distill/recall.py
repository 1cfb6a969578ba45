"""Recall positions of a batch, and stage 3's weights on them (`stages.stage3.recall_weight`).

Why: the students lose in-context recall first (LAMBADA's last word, usually a name from far back, falls from 29 to
11 where the other tasks keep 92%), yet such tokens are a small share of a batch, so a plain mean of the per-token
divergence barely asks for them. A position is a recall position when the token it predicts appeared in the
sequence more than `window` tokens back and not within the last `window` tokens: the model can only get it from far
context (a name, a rare word). Frequent words recur within any window and are left out by the second condition.
With SmolLM2's tokenizer, on the offline NLTK texts in sequences of 2,048 tokens, 11-13% of the positions are
recall positions at a window of 256 (the default), 25-30% at 64 and 44-51% at 16. The ids alone decide it, so it
costs one comparison of each position's next token with the earlier tokens (b x L x L booleans, 64 MB at 16 x
2048), no teacher pass, and a CUDA graph can capture it.

Weights are 1 + recall_weight at recall positions and 1 elsewhere, divided by their mean over the batch: the loss
keeps its scale (a mean over tokens) and shifts its attention to recall tokens.
"""

from __future__ import annotations

import torch


def recall_positions(input_ids: torch.Tensor, window: int) -> torch.Tensor:
    """(b, L - 1) booleans: whether the token at t + 1 appeared at or before t - window and not after it."""
    if window < 1:
        raise ValueError(f"window={window} must be at least 1")
    L = input_ids.shape[1]
    target, context = input_ids[:, 1:], input_ids[:, :-1]  # position t predicts target[t] from context[: t + 1]
    same = target[:, :, None] == context[:, None, :]  # (b, L - 1, L - 1): [t, j] next token at t equals token j
    t = torch.arange(L - 1, device=input_ids.device)
    back = t[:, None] - t[None, :]  # how far token j lies behind position t (negative: after it)
    far = (same & (back >= window)).any(-1)
    near = (same & (back >= 0) & (back < window)).any(-1)
    return far & ~near


def recall_weights(input_ids: torch.Tensor, weight: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (b * (L - 1),) with mean 1: 1 + weight at recall positions, 1 elsewhere, normalised; the share of
    recall positions, a 0-d tensor), in the order of the flattened (b, L - 1) predictions."""
    recall = recall_positions(input_ids, window).flatten().float()
    raw = 1.0 + weight * recall
    return raw / raw.mean(), recall.mean()
