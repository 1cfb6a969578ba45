"""Teacher adapters: one forward gives block inputs/outputs and post-RoPE Q/K whose attention matrix is the
teacher's own; the capture changes nothing in the teacher's output."""

import pytest
import torch

from distill.config import ConfigError, TeacherConfig
from distill.models.teachers import load_teacher
from tests.gguf_writer import EOS


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def eager_reference(teacher, ids):
    """The same teacher run by transformers' eager attention, with attention weights and hidden states."""
    model = teacher.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)


def test_capture_matches_eager(tiny_teacher):
    ids = torch.randint(0, 257, (2, 37), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    layers = list(range(tiny_teacher.num_layers))
    captured = tiny_teacher.capture(ids, layers, logits=True)
    ref = eager_reference(tiny_teacher, ids)
    assert rel(captured.logits, ref.logits) < 1e-5
    for i in layers:
        record = captured.layers[i]
        assert rel(record.block_input, ref.hidden_states[i]) < 1e-6
        if i + 1 < len(layers):  # the last hidden state is after the final norm
            assert rel(record.block_output, ref.hidden_states[i + 1]) < 1e-6
        assert rel(record.attention_matrix(), ref.attentions[i]) < 1e-5
    # GQA: the tiny Llama has fewer KV heads than query heads, and K is captured un-repeated.
    cfg = tiny_teacher.config
    assert captured.layers[0].k.shape[2] == cfg.num_key_value_heads
    assert captured.layers[0].q.shape[2] == cfg.num_attention_heads


def test_capture_only_requested_layers(tiny_llama):
    ids = torch.randint(0, 257, (1, 16))
    captured = tiny_llama.capture(ids, [2])
    assert set(captured.layers) == {2} and captured.logits is None
    assert captured.layers[2].q is not None


def test_unsupported_architecture_is_refused():
    cfg = TeacherConfig(name="gpt2", source="random", architecture={"model_type": "gpt2", "n_layer": 1, "n_embd": 32,
                                                                  "n_head": 2, "vocab_size": 50})
    with pytest.raises(ConfigError, match="not supported; supported model types: llama, qwen2, phi"):
        load_teacher(cfg)


def test_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_teacher(TeacherConfig(name="x", source="gguf", path=str(tmp_path / "nothing.gguf")))


def test_gguf_teacher_is_the_model_written(tiny_gguf):
    """The test GGUF writer (tests/gguf_writer.py) is faithful: the teacher read back is the model written, Q/K
    layout included, and its byte-level BPE tokenizer applies the file's merges and round-trips text."""
    source, path = tiny_gguf
    teacher = load_teacher(TeacherConfig(name="tiny-gguf", source="gguf", path=str(path)))
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(0, source.config.vocab_size, (2, 37), generator=generator)
    with torch.no_grad():
        assert rel(teacher.logits(ids), source(ids).logits) < 1e-6
    tok = teacher.tokenizer
    assert tok.convert_ids_to_tokens(tok(" the cat").input_ids) == ["Ġthe", "Ġ", "c", "a", "t"]
    text = "naïve café: 3 × 4 = 12\n"
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == source.config.vocab_size  # no token the model has no embedding for
    assert tok.eos_token == EOS and tok.eos_token_id == teacher.config.eos_token_id == source.config.vocab_size - 1


def test_a_gguf_teacher_is_parsed_once_and_loads_as_parsed_anew(tiny_gguf, monkeypatch):
    """load_teacher parses a GGUF file once for config, tokenizer and weights (transformers alone parses it four
    times: ~50 s for SmolLM2 on 2 cores); the teacher is the one loaded without the sharing, and gguf's own reader
    is back in place afterwards."""
    import contextlib

    import gguf

    from distill.models.teachers import sources

    _, path = tiny_gguf
    cfg = TeacherConfig(name="tiny-gguf", source="gguf", path=str(path))
    original = gguf.GGUFReader
    parses = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a[0]) or original(*a, **k))
    shared = load_teacher(cfg)
    assert len(parses) == 1
    monkeypatch.setattr(sources, "parse_gguf_once", contextlib.nullcontext)
    anew = load_teacher(cfg)
    assert len(parses) > 2  # what the sharing saves: transformers' own parses
    assert shared.config.to_dict() == anew.config.to_dict()
    a, b = shared.model.state_dict(), anew.model.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    text = "naïve café: 3 × 4 = 12\n"
    assert shared.tokenizer(text).input_ids == anew.tokenizer(text).input_ids
    assert gguf.GGUFReader.__name__ == "<lambda>"  # the block put back what it found
