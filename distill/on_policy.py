"""On-policy sequences for stage 3 (generalized knowledge distillation's lambda): on a set fraction of the steps the
student writes the last `tokens` tokens of each sequence itself, after the rest of the batch's text as a prompt, and
the teacher scores what it wrote; the loss is the stage's divergence as on any batch. A student trained only on text
it did not write never sees its own mistakes; sampling from it shows them to the teacher. Each written token is one
decode step (on CUDA replayed as a CUDA graph, `enable_cuda_graph_decode`), so the written part is kept short.

Which steps: step i (counted from 0) is on-policy when floor((i + 1) * fraction) > floor(i * fraction), so exactly
that fraction of any run of steps, evenly spread. The sampling is seeded by the run's seed and the step, so a
resumed run writes the same sequences as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch


class OnPolicy:
    def __init__(self, fraction: float, tokens: int, temperature: float, seed: int):
        self.fraction, self.tokens, self.temperature, self.seed = fraction, tokens, temperature, seed

    def chosen(self, step: int) -> bool:
        return math.floor((step + 1) * self.fraction) > math.floor(step * self.fraction)

    @torch.no_grad()
    def sequences(self, student, batch: torch.Tensor, step: int) -> torch.Tensor:
        """`batch` (b, L) with its last `tokens` tokens written by `student`, sampled at the temperature (full
        vocabulary, no top-k or top-p), in eval mode; the student's mode is restored."""
        L = batch.shape[1]
        prompt = batch[:, : L - self.tokens]
        devices = [batch.device] if batch.device.type == "cuda" else []
        if batch.is_cuda and student._graph_decoders is None:
            student.enable_cuda_graph_decode()  # the weights are read in place: later steps' updates are seen
        was_training = student.training
        student.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 1_000_003 + step)
                out = student.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=self.tokens,
                    min_new_tokens=self.tokens,
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=None,
                    top_p=None,
                    pad_token_id=0,
                    use_cache=True,
                )
        finally:
            student.train(was_training)
        return out[:, :L]
