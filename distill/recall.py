"""Recall positions: where the teacher needs far context. `distill rank` measures a student's KL there (its recall
KL), and stage 3 can weigh them more (`stages.stage3.recall_weight`).

A position is a recall position when the teacher's log-probability of the true next token drops by more than
`margin` nats once every attention layer of the teacher sees only the last `window` tokens (plus the first `sink`,
the attention sinks windowed models keep): the copies of names and facts from far back that LAMBADA measures, and
that the students lose first (LAMBADA 29 -> 11 where the other tasks keep 92%). It costs a second, windowed teacher
forward and the true token's log-probability under both (two LM-head products over the vocabulary).

Why the teacher and not the ids alone: a cheaper rule, "the next token appeared more than w tokens back and not
since" (or "... for the first time"), was measured against this definition on the offline NLTK texts (SmolLM2-135M,
float32, 8 sequences of 1,024 tokens, window 16, sink 4, margin 1: 28.8% of the positions are recall positions).
At any w from 8 to 256 the rule's precision was 0.32-0.42 against the 0.29 of a random pick, and its recall at most
0.54 (at w = 8, where it picks half of all positions): the ids say little about where the teacher uses far context.
"""

from __future__ import annotations

import torch


def window_mask(length: int, window: int, sink: int, device) -> torch.Tensor:
    """(1, 1, L, L) bool, True where query i may attend key j: causal, and j within the last `window` positions
    (i - j < window) or among the first `sink` (attention sinks, which windowed models keep)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return ((j <= i) & ((i - j < window) | (j < sink)))[None, None]


def true_token_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk: int = 4096,
                        matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p(target) per position (n,) from final hidden states (n, H), a chunk of positions at a time; the LM
    head's product in `matmul_dtype`, the log-softmax in float32."""
    from .stages.divergence import head_logits  # here: distill.stages imports this module (stage 3's weighting)

    out = torch.empty(hidden.shape[0], device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, min(start + chunk, hidden.shape[0]))
        logits = head_logits(hidden[rows], head.weight, head.bias, matmul_dtype).float()
        out[rows] = torch.log_softmax(logits, -1).gather(-1, targets[rows, None])[:, 0]
    return out


@torch.no_grad()
def recall_positions(teacher, input_ids: torch.Tensor, full_hidden: torch.Tensor, window: int, sink: int,
                     margin: float, matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(b, L - 1) bool: where the teacher (a distill Teacher) loses more than `margin` nats on the true next token
    when windowed; `full_hidden` (b, L, H) is its final hidden states on `input_ids` with the whole context. The
    windowed forward runs under the caller's autocast."""
    b, L = input_ids.shape
    targets = input_ids[:, 1:].flatten()
    mask = window_mask(L, window, sink, input_ids.device)
    local = teacher.model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    with torch.autocast(input_ids.device.type, enabled=False):  # the LM head's products in matmul_dtype as asked
        full = true_token_logprobs(full_hidden[:, :-1].flatten(0, 1), teacher.lm_head, targets,
                                   matmul_dtype=matmul_dtype)
        windowed = true_token_logprobs(local[:, :-1].flatten(0, 1), teacher.lm_head, targets,
                                       matmul_dtype=matmul_dtype)
    return (full - windowed > margin).view(b, L - 1)


def recall_weights(positions: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position weights, flattened, with mean 1: 1 + weight at recall positions and 1 elsewhere, divided by
    their mean, so the loss keeps its scale; the share of recall positions, a 0-d tensor)."""
    recall = positions.flatten().float()
    raw = 1.0 + weight * recall
    return raw / raw.mean(), recall.mean()
