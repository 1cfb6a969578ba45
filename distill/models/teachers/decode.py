"""Fast batched sampling from a Llama-family teacher: a static KV cache and one CUDA graph per decode step.

On a GPU whose host CPU is slow, one `generate()` step of a small teacher costs tens of milliseconds of Python and
kernel launches whatever the batch. Here a decode step is captured as a CUDA graph over static buffers (token in,
position, KV cache, logits out) and replayed, so a step costs one launch plus the sampling kernels, and a large
batch makes the GPU the bottleneck again. At large batch a step is bound by reading the KV cache, so a step reads
only the cache up to the end of its position's bucket of `bucket` positions: one graph per bucket, captured on
first use, all sharing one memory pool.

The teacher's own modules do the work (embedding, norms, projections, MLPs, rotary table, LM head): only the
attention over the static cache is written here, so the engine computes what the teacher computes. Every sequence of
a batch has the same prompt length (prompts are fixed-length token prefixes), so there is no padding: all rows share
one position. Llama, SmolLM2 and Qwen2 (same block, biases in q/k/v) take this path; other families fall back to
`generate()` (see distill/generate.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FAST_MODEL_TYPES = ("llama", "qwen2")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split convention Llama uses (cos, sin: (L, d) broadcast over batch and heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StaticDecoder:
    """Prefill and one-token decode steps of a Llama-family model over a static KV cache of `max_len` positions.

    Shapes: the cache is (layers, 2, batch, kv_heads, max_len, head_dim) in the model's dtype. `prefill(ids)` takes
    (batch, P) prompt ids and returns the last position's logits; `step(tokens)` takes (batch,) ids at the next
    position and returns that position's logits (batch, vocab) in float32. On CUDA with `cuda_graph=True` the step is
    captured once and replayed.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, cuda_graph: bool = True, bucket: int = 64):
        config = model.config
        if config.model_type not in FAST_MODEL_TYPES:
            raise ValueError(f"StaticDecoder supports {FAST_MODEL_TYPES}, not {config.model_type!r}")
        self.model, self.body = model, model.model
        self.batch_size, self.max_len = batch_size, max_len
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        n_layers = config.num_hidden_layers
        self.cache = torch.zeros(
            n_layers, 2, batch_size, self.n_kv, max_len, self.head_dim, device=self.device, dtype=self.dtype
        )
        # The rotary table for every position, from the model's own rotary module (its scaling rules included).
        positions = torch.arange(max_len, device=self.device)[None]
        probe = torch.zeros(1, max_len, self.head_dim, device=self.device, dtype=self.dtype)
        cos, sin = self.body.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        self.scale = 1.0 / self.head_dim**0.5
        self.position = 0
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.bucket = bucket
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # cache end -> (graph, logits)
        self._pool = None
        self._tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)

    # -- the forward pass, shared by prefill (P positions from 0) and decode (one position at self._pos) --

    def _attention(
        self, layer_idx: int, attn: nn.Module, h: torch.Tensor, start: int | None, end: int = 0
    ) -> torch.Tensor:
        b, L, _ = h.shape
        q = attn.q_proj(h).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        cache_k, cache_v = self.cache[layer_idx, 0], self.cache[layer_idx, 1]
        if start is not None:  # prefill: positions start .. start+L-1, causal among themselves
            cos, sin = self.cos[start : start + L], self.sin[start : start + L]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            cache_k[:, :, start : start + L] = k
            cache_v[:, :, start : start + L] = v
            keys, values = cache_k[:, :, : start + L], cache_v[:, :, : start + L]
            group = self.n_heads // self.n_kv
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            mask = torch.ones(L, start + L, dtype=torch.bool, device=h.device).tril(start)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        else:  # decode: one position, read from the device tensor self._pos so a captured graph stays valid
            cos, sin = self.cos.index_select(0, self._pos), self.sin.index_select(0, self._pos)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            cache_k.index_copy_(2, self._pos, k)
            cache_v.index_copy_(2, self._pos, v)
            # The query heads sharing a KV head become that head's "queries" (all at the same position): GQA
            # without repeating the cache. Only the cache up to `end` is read (the step's bucket).
            group = self.n_heads // self.n_kv
            q = q.reshape(b, self.n_kv, group, self.head_dim)
            keys, values = cache_k[:, :, :end], cache_v[:, :, :end]
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale
            future = torch.arange(end, device=h.device) > self._pos
            weights = scores.masked_fill(future, float("-inf")).softmax(-1).to(values.dtype)
            out = torch.matmul(weights, values).reshape(b, self.n_heads, 1, self.head_dim)
        out = out.transpose(1, 2).reshape(b, L, self.n_heads * self.head_dim)
        return attn.o_proj(out)

    def _forward(self, ids: torch.Tensor, start: int | None, end: int = 0) -> torch.Tensor:
        h = self.body.embed_tokens(ids)
        for idx, layer in enumerate(self.body.layers):
            h = h + self._attention(idx, layer.self_attn, layer.input_layernorm(h), start, end)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(self.body.norm(h[:, -1])).float()

    # -- public API --

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        b, P = ids.shape
        if b != self.batch_size:
            raise ValueError(f"prefill got a batch of {b}, the decoder was built for {self.batch_size}")
        if P >= self.max_len:
            raise ValueError(f"a prompt of {P} tokens leaves no room in a cache of {self.max_len} positions")
        self.position = P
        return self._forward(ids, start=0)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.position >= self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; all are used")
        self._tokens.copy_(tokens)
        self._pos.fill_(self.position)
        end = min(self.max_len, (self.position // self.bucket + 1) * self.bucket)
        self.position += 1
        if not self.use_graph:
            return self._forward(self._tokens[:, None], start=None, end=end)
        if end not in self._graphs:
            self._graphs[end] = self._capture(end)
        graph, logits = self._graphs[end]
        graph.replay()
        return logits

    def _capture(self, end: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (allocator and lazy initialisation), then capture. The warm-up writes the cache at
        # the current position, which the replay after capture writes again with the same values.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(self._tokens[:, None], start=None, end=end)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(self._tokens[:, None], start=None, end=end)
        return graph, logits


# Nucleus sampling looks for the nucleus among the `TOP_K` most likely tokens first (a top-k is several times faster
# than sorting the whole vocabulary); rows whose nucleus is larger than that are sorted whole. The result is exact.
TOP_K = 1024


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (batch,) from float logits (batch, vocab): greedy at temperature 0, else nucleus sampling (the
    smallest set of most likely tokens whose probability reaches top_p, the token that crosses it included)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    k = min(TOP_K, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)  # sorted, most likely first
    if k < probs.shape[-1]:
        short = top.sum(-1) < top_p  # the nucleus reaches past the top k: sort these rows whole
        if bool(short.any()):
            rows = short.nonzero()[:, 0]
            full, full_order = probs[rows].sort(dim=-1, descending=True)
            token = _nucleus_draw(full, full_order, top_p, generator)
            result = _nucleus_draw(top, order, top_p, generator)
            return result.index_put_((rows,), token)
    return _nucleus_draw(top, order, top_p, generator)


def _nucleus_draw(sorted_probs, order, top_p, generator) -> torch.Tensor:
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before a token already reaches top_p
    choice = torch.multinomial(sorted_probs.masked_fill(drop, 0.0), 1, generator=generator)
    return order.gather(-1, choice)[:, 0]
