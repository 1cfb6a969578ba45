"""What the benchmarks share: the architectures they build random teachers from, and how a table is reported."""

from __future__ import annotations

from pathlib import Path

# SmolLM2-135M-Instruct's architecture (from its GGUF's metadata): its speed without the GGUF file.
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
# Llama-3.2-1B's architecture (no hub on the GPU machine; memory and speed do not depend on the weights).
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                max_position_embeddings=8192, tie_word_embeddings=True)
# A tiny Llama for smoke runs on the CPU.
TINY = dict(model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def report(table: str, out: str | None) -> None:
    """Print a result table last (a remote command's output keeps its end) and write it to `out` if given."""
    print("\n" + table)
    if out:
        Path(out).write_text(table + "\n")
