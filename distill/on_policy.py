"""On-policy sequences for stage 3 (generalized knowledge distillation's lambda): on a set fraction of the steps the
student writes each sequence's continuation itself, after the first `prompt` tokens of the batch's text, and the
teacher scores what it wrote; the loss is the stage's divergence as on any batch. A student trained only on text it
did not write never sees its own mistakes; sampling from it shows them to the teacher.

Which steps: step i (counted from 0) is on-policy when floor((i + 1) * fraction) > floor(i * fraction), so exactly
that fraction of any run of steps, evenly spread. The sampling is seeded by the run's seed and the step, so a
resumed run writes the same sequences as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch


class OnPolicy:
    def __init__(self, fraction: float, prompt: int, temperature: float, seed: int):
        self.fraction, self.prompt, self.temperature, self.seed = fraction, prompt, temperature, seed

    def chosen(self, step: int) -> bool:
        return math.floor((step + 1) * self.fraction) > math.floor(step * self.fraction)

    @torch.no_grad()
    def sequences(self, student, batch: torch.Tensor, step: int) -> torch.Tensor:
        """`batch` (b, L) with everything after its first `prompt` tokens written by `student`, sampled at the
        temperature (full vocabulary, no top-k or top-p), in eval mode; the student's mode is restored."""
        b, L = batch.shape
        devices = [batch.device] if batch.device.type == "cuda" else []
        was_training = student.training
        student.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 1_000_003 + step)
                out = student.generate(
                    batch[:, : self.prompt],
                    attention_mask=torch.ones_like(batch[:, : self.prompt]),
                    max_new_tokens=L - self.prompt,
                    min_new_tokens=L - self.prompt,
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
