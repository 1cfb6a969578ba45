"""Generation on the student's recurrent cache: prefill by the chunked scan, then one-token steps.

Greedy generate() equals a full re-forward argmax loop token for token; prefill-then-step logits equal the full
forward's; left padding does not leak into an SSD state; an SSD layer's cache does not grow with the length.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

from distill.config import StudentConfig
from distill.models.student.modeling_distill import DistillCache, SSDLayerState, grouped_decode_attention
from distill.models.transfer import build_student


def student_for(teacher, form="discrete", attention_layers=(), d_state=0):
    """A student whose mixers do something: the transfer closes the gate and zeroes D, so randomise them."""
    cfg = StudentConfig(form=form, d_state=d_state)
    student = build_student(teacher, cfg, attention_layers=list(attention_layers)).eval()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "self_attn.in_proj" in name or name.endswith("self_attn.D") or "self_attn.out_proj" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return student


def greedy_by_reforward(model, ids, new_tokens):
    seq = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


CASES = [
    ("tiny-llama", "discrete", ()),
    ("tiny-llama", "mamba2", ()),
    ("tiny-llama", "discrete", (1, 3)),  # hybrid whose layer 0 is SSD
    ("tiny-phi", "discrete", ()),
    ("tiny-phi", "mamba2", (0,)),  # hybrid whose layer 0 is attention
]


@pytest.mark.parametrize("teacher_name, form, keep", CASES)
def test_greedy_generate_equals_reforward(teacher_name, form, keep, tiny_llama, tiny_phi):
    teacher = {"tiny-llama": tiny_llama, "tiny-phi": tiny_phi}[teacher_name]
    student = student_for(teacher, form, keep)
    ids = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    # No EOS: both run the full 14 tokens (a row that stopped early would be padded by generate()).
    out = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 14
    assert torch.equal(out, greedy_by_reforward(student, ids, 14))


# d_state 32: a state twice tiny-llama's head size (16), so the cache's (b, h, p, n) state has n != p.
@pytest.mark.parametrize("form, keep, d_state", [("discrete", (), 0), ("mamba2", (2,), 0), ("mamba2", (), 32)])
def test_prefill_then_steps_match_full_forward(tiny_llama, form, keep, d_state):
    student = student_for(tiny_llama, form, keep, d_state)
    ids = torch.randint(0, 257, (3, 21), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    with torch.no_grad():
        full = student(input_ids=ids, use_cache=False).logits
        cache = DistillCache(student.config)
        got = [student(input_ids=ids[:, :13], past_key_values=cache, use_cache=True).logits]
        states = [cache.layers[0].ssm_state.shape]
        for t in range(13, 21):
            got.append(student(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    got = torch.cat(got, 1)
    assert ((got - full).norm() / full.norm()).item() < 1e-5
    assert cache.get_seq_length() == 21
    ssd_slot = next(layer for layer in cache.layers if isinstance(layer, SSDLayerState))
    assert ssd_slot.ssm_state.shape == states[0]  # constant memory: no growth with length
    assert ssd_slot.ssm_state.shape[-1] == (d_state or 16)
    assert ssd_slot.ssm_state.dtype == torch.float32


@pytest.mark.parametrize("keep", [(), (1,)])
def test_left_padding_does_not_enter_the_state(tiny_llama, keep):
    student = student_for(tiny_llama, "discrete", keep)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    short, long = torch.randint(0, 256, (1, 5), generator=g), torch.randint(0, 256, (1, 9), generator=g)
    pad = 256
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=pad, eos_token_id=None)
    together = student.generate(batch, attention_mask=mask, **kwargs)
    alone_short = student.generate(short, attention_mask=torch.ones_like(short), **kwargs)
    alone_long = student.generate(long, attention_mask=torch.ones_like(long), **kwargs)
    assert torch.equal(together[0, 4:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("teacher_name, keep, d_state", [("tiny-llama", (), 0), ("tiny-phi", (), 0),
                                                          ("tiny-llama", (1, 3), 0), ("tiny-phi", (0,), 0),
                                                          ("tiny-llama", (), 32)])
def test_cuda_graph_decode_equals_eager(teacher_name, keep, d_state, tiny_llama, tiny_phi):
    teacher = {"tiny-llama": tiny_llama, "tiny-phi": tiny_phi}[teacher_name]
    student = student_for(teacher, "discrete", keep, d_state).cuda()
    ids = torch.randint(0, 257, (3, 11), device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, eos_token_id=None,
                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    eager = student.generate(ids, **kwargs)
    student.enable_cuda_graph_decode()
    graphed = student.generate(ids, **kwargs)
    again = student.generate(ids, **kwargs)  # a second generation rebinds the captured graph to its own cache
    assert 3 in student._graph_decoders
    for out in (graphed, again):
        assert torch.equal(out.sequences, eager.sequences)
        for a, b in zip(out.logits, eager.logits):
            assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("form, keep", [("discrete", ()), ("mamba2", (1,))])
def test_prefill_in_chunks_equals_one_pass(tiny_llama, form, keep):
    """A prompt prefilled 8 tokens at a time gives one pass's logits and generation, left padding included where
    the padding is longer than a chunk (it must not enter the state in the second chunk either)."""
    student = student_for(tiny_llama, form, keep)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(0, 256, (2, 29), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :11] = 0
    ids[0, :11] = 256
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=256, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        student.prefill_chunk_size = None
        one = student.generate(ids, **kwargs)
        full = student(input_ids=ids[1:], use_cache=True).logits
        student.prefill_chunk_size = 8
        chunked = student.generate(ids, **kwargs)
        full_chunked = student(input_ids=ids[1:], use_cache=True).logits
    assert torch.equal(chunked.sequences, one.sequences)
    for a, b in zip(chunked.logits, one.logits):
        assert ((a - b).norm() / b.norm()).item() < 1e-5
    assert full_chunked.shape == full.shape  # every position's logits when all were asked for
    assert ((full_chunked - full).norm() / full.norm()).item() < 1e-5


def test_a_pure_student_builds_no_attention_mask(tiny_llama, monkeypatch):
    """No layer of a pure-SSD student attends, so no (batch, 1, queries, keys) mask is built, behind a cache or from
    a 2-D mask; a hybrid still gets its mask."""
    import transformers.models.llama.modeling_llama as llama

    built = []
    original = llama.create_causal_mask

    def spy(*args, **kwargs):
        mask = original(*args, **kwargs)
        built.append(0 if mask is None else mask.numel())
        return mask

    monkeypatch.setattr(llama, "create_causal_mask", spy)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for keep, expect_mask in (((), False), ((1,), True)):
        student = student_for(tiny_llama, "discrete", keep)
        built.clear()
        with torch.no_grad():
            cache = DistillCache(student.config)
            student(input_ids=ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache, use_cache=True)
            student(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=cache, use_cache=True)
        assert built
        assert (max(built) >= 2 * 4 * 12) == expect_mask, (keep, built)


@pytest.mark.parametrize("teacher_name, keep", [("tiny-llama", (1, 3)), ("tiny-phi", (0,)), ("tiny-llama", ())])
def test_the_captured_decode_step_run_uncaptured_equals_eager(teacher_name, keep, tiny_llama, tiny_phi, monkeypatch):
    """The function a CUDA graph captures for a decode step (static SSD states; a hybrid's static KV buffers behind
    a mask built from the step's position), run uncaptured on the CPU, generates what eager steps do: left padding
    stays hidden, a second generation rebinds the decoder, and one that outgrows the keys' room gets a new one."""
    from distill.models.student.modeling_distill import GraphDecoder

    teacher = {"tiny-llama": tiny_llama, "tiny-phi": tiny_phi}[teacher_name]
    student = student_for(teacher, "discrete", keep)
    monkeypatch.setattr(GraphDecoder, "headroom", 8)  # room for 24 positions with a 9-token prompt: outgrown
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3], ids[0, :3] = 0, 256
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=256, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)
    eager = student.generate(ids, **kwargs)
    steps, grouped = [], []
    original = GraphDecoder.step
    monkeypatch.setattr(GraphDecoder, "step", lambda self, *a: steps.append(self) or original(self, *a))
    spy = lambda *a, **k: grouped.append(1) or grouped_decode_attention(*a, **k)  # noqa: E731
    AttentionInterface.register("distill_grouped_decode", spy)
    student.enable_cuda_graph_decode()
    student._graph_decode_capture = False
    try:
        static = student.generate(ids, **kwargs)
        again = student.generate(ids, **kwargs)
    finally:
        AttentionInterface.register("distill_grouped_decode", grouped_decode_attention)
    assert len(steps) == 2 * 19  # every step after the prefill went through a decoder
    assert len(grouped) == 2 * 19 * len(keep)  # each kept layer's step attention without repeated keys
    assert student.config._attn_implementation in ("sdpa", "eager")  # restored for eager forwards
    if keep:
        assert len({id(d) for d in steps}) == 2 and steps[-1].capacity == 32  # outgrew 16, then 32 from the first
    for out in (static, again):
        assert torch.equal(out.sequences, eager.sequences)
        for a, b in zip(out.logits, eager.logits):
            assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_grouped_decode_attention_equals_attention_over_repeated_keys(heads, kv_heads):
    """The captured step's attention (query heads folded onto their KV head) against softmax attention over keys
    repeated to every query head, in float64, with masked positions (unwritten room and left padding)."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    b, L, d = 3, 37, 16
    q = torch.randn(b, heads, 1, d, dtype=torch.float64, generator=g)
    k = torch.randn(b, kv_heads, L, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, kv_heads, L, d, dtype=torch.float64, generator=g)
    allowed = torch.rand(b, L, generator=g) > 0.3
    allowed[:, 0] = True
    mask = torch.zeros(b, 1, 1, L, dtype=torch.float64).masked_fill(~allowed[:, None, None, :], -1e300)
    out, _ = grouped_decode_attention(None, q, k, v, mask, scaling=0.3)
    repeat = heads // kv_heads
    kr, vr = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    weights = torch.softmax(q @ kr.transpose(-1, -2) * 0.3 + mask, dim=-1)
    expected = (weights @ vr).transpose(1, 2)  # (b, 1, heads, d), as transformers' attention functions return
    assert out.shape == expected.shape
    assert ((out - expected).norm() / expected.norm()).item() < 1e-12
    with pytest.raises(ValueError, match="one query token"):
        grouped_decode_attention(None, q.expand(b, heads, 2, d), k, v, None)
