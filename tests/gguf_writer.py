"""Write a Hugging Face Llama as a GGUF file the way llama.cpp lays one out, for tests of teacher.source=gguf.

    model, path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    teacher = load_teacher(TeacherConfig(name="tiny-gguf", source="gguf", path=str(path)))

Tensors stay float32 (no quantisation code); names come from the `gguf` package's own HF -> GGUF map. The
tokenizer is byte-level BPE ("gpt2" in GGUF terms): the 256 byte symbols, a few merges, and EOS, which is what
transformers' GGUF loader rebuilds as a GPT2Tokenizer. `model` is the source the file was written from, so a
test can check that loading the file gives the same model back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# A handful of merges, so the file's tokenizer really is BPE and not just its byte alphabet.
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"), ("o", "n"))
# GPT-2's own end-of-text token: transformers builds a GGUF's byte-level tokenizer as a GPT2Tokenizer, which adds
# this token (one past the model's vocabulary) if the file's vocabulary lacks it.
EOS = "<|endoftext|>"


def byte_level_vocabulary() -> list[str]:
    """The 256 byte symbols in byte order, the merged tokens in merge order, then EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    return [symbols[b] for b in range(256)] + [a + b for a, b in MERGES] + [EOS]


def to_gguf_rope_layout(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K rows from HF's rotate-half order (per head: first halves, then second halves) to the interleaved pairs
    llama.cpp stores; transformers' GGUF loader undoes exactly this."""
    rows = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, rows // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def write_llama_gguf(model, path: str | Path, name: str = "tiny-llama") -> Path:
    """Write `model` (a transformers LlamaForCausalLM whose vocabulary is byte_level_vocabulary()) to `path`."""
    import gguf

    cfg = model.config
    tokens = byte_level_vocabulary()
    if cfg.vocab_size != len(tokens):
        raise ValueError(f"the model's vocab_size {cfg.vocab_size} is not the tokenizer's {len(tokens)}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    eos = tokens.index(EOS)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    for add_id in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_pad_token_id):
        add_id(eos)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # no `output.weight`: the loader then ties the head to the embedding
        module, suffix = hf_name.rsplit(".", 1)
        tensor = tensor.detach().float()
        if module.endswith("self_attn.q_proj"):
            tensor = to_gguf_rope_layout(tensor, cfg.num_attention_heads)
        elif module.endswith("self_attn.k_proj"):
            tensor = to_gguf_rope_layout(tensor, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(tensor.numpy()))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_tiny_llama_gguf(path: str | Path, seed: int = 0, layers: int = 2):
    """(model, path): a random tiny GQA Llama (hidden 64, 4 query heads, 2 KV heads, tied head) written to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(byte_level_vocabulary()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model, write_llama_gguf(model, path)
