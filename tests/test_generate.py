"""`distill generate`: the static-cache decoder computes what the teacher computes; shards are deterministic,
resumable, and read back by the data config (alone or mixed with real text)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from distill.cli import compose
from distill.config import ConfigError
from distill.data import PackedData, build_data
from distill.generate import Generator
from distill.models.teachers.decode import StaticDecoder, sample


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_static_decoder_logits_match_full_forward(tiny_llama):
    model = tiny_llama.model
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    full = model(input_ids=ids, use_cache=False).logits.float()
    decoder = StaticDecoder(model, batch_size=3, max_len=24)
    got = [decoder.prefill(ids[:, :12])]
    for t in range(12, 20):
        got.append(decoder.step(ids[:, t]))
    for i, logits in enumerate(got[:-1]):
        assert _rel(logits, full[:, 11 + i]) < 1e-5, i
    assert _rel(got[-1], full[:, 19]) < 1e-5


def test_static_decoder_greedy_equals_hf_generate(tiny_llama):
    model = tiny_llama.model
    torch.manual_seed(2)
    prompts = torch.randint(0, model.config.vocab_size, (2, 8))
    expected = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=16, do_sample=False, min_new_tokens=16
    )[:, 8:]
    decoder = StaticDecoder(model, batch_size=2, max_len=24)
    logits, tokens = decoder.prefill(prompts), []
    for _ in range(16):
        tokens.append(sample(logits, 0.0, 1.0, None))
        logits = decoder.step(tokens[-1])
    assert torch.equal(torch.stack(tokens, 1), expected)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, 1.0, 0.8, g)  # 0.5 + 0.3 reaches 0.8: tokens 0 and 1 only
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05


def test_top_p_past_the_top_k_sorts_those_rows(monkeypatch):
    from distill.models.teachers import decode

    monkeypatch.setattr(decode, "TOP_K", 2)
    wide = torch.log(torch.tensor([0.3, 0.3, 0.2, 0.2]))  # top_p 0.9 needs all four: past the top 2
    narrow = torch.log(torch.tensor([0.9, 0.05, 0.03, 0.02]))  # top_p 0.9 needs token 0 only
    logits = torch.stack([wide, narrow] * 1000)
    drawn = sample(logits, 1.0, 0.9, torch.Generator().manual_seed(0)).view(1000, 2)
    assert set(drawn[:, 0].tolist()) == {0, 1, 2, 3}
    assert set(drawn[:, 1].tolist()) == {0}


def _gen_cfg(tmp_path, *overrides, name="gen"):
    return compose(
        [
            "teacher=tiny-llama",
            f"out={tmp_path / name}",
            "tokens=600",
            "batch_size=3",
            "new_tokens=64",
            "prompt_tokens=16",
            "progress=false",
            *overrides,
        ],
        "generate",
    )


def _shards(folder):
    shards = {}
    for path in sorted(folder.glob("shard-*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            shards[path.name] = f.read()
    return shards


def _first_row(folder):
    with gzip.open(folder / "shard-00000.jsonl.gz", "rt") as f:
        return json.loads(f.readline())


def test_generate_is_deterministic_and_resumes(tmp_path):
    whole = Generator(_gen_cfg(tmp_path, name="whole")).run()
    assert whole["tokens"] >= 600
    # Interrupted: a shorter run, then the last shard lost as if killed before its rename, then the full run.
    Generator(_gen_cfg(tmp_path, "tokens=250", name="parts")).run()
    parts = tmp_path / "parts"
    last = max(parts.glob("shard-*.jsonl.gz"))
    last.unlink()
    resumed = Generator(_gen_cfg(tmp_path, name="parts")).run()
    assert resumed["generated_now"] > 0
    assert _shards(parts) == _shards(tmp_path / "whole")
    # Another seed samples other text from the same prompts.
    other = Generator(_gen_cfg(tmp_path, "seed=1", "tokens=100", name="other")).run()
    assert other["tokens"] > 0
    a, b = (_first_row(tmp_path / d) for d in ("whole", "other"))
    assert a["input_ids"][:16] == b["input_ids"][:16] and a["input_ids"] != b["input_ids"]


def test_generate_refuses_other_settings_in_same_folder(tmp_path):
    Generator(_gen_cfg(tmp_path, "tokens=50")).run()
    with pytest.raises(ConfigError, match="temperature"):
        Generator(_gen_cfg(tmp_path, "temperature=0.5"))


def test_generate_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="chat template"):
        Generator(_gen_cfg(tmp_path, "prompts=chat"))
    with pytest.raises(ConfigError, match="positions"):
        Generator(_gen_cfg(tmp_path, "new_tokens=600"))
    with pytest.raises(ConfigError, match="top_p"):
        Generator(_gen_cfg(tmp_path, "top_p=0"))


def test_generate_other_families_through_hf_generate(tmp_path):
    cfg = _gen_cfg(tmp_path, "teacher=tiny-phi", "tokens=100", "new_tokens=32")
    gen = Generator(cfg)
    assert not gen.fast
    gen.run()
    again = Generator(_gen_cfg(tmp_path, "teacher=tiny-phi", "tokens=100", "new_tokens=32", name="again")).run()
    assert again["tokens"] > 0
    assert _shards(tmp_path / "gen") == _shards(tmp_path / "again")


def test_generated_shards_train_through_data_mix(tmp_path, tiny_llama):
    Generator(_gen_cfg(tmp_path)).run()
    with gzip.open(tmp_path / "gen" / "shard-00000.jsonl.gz", "rt") as f:
        shard_ids = [i for line in f for i in json.loads(line)["input_ids"]]
    cfg = compose(["experiment=tiny", f"data.mix_path={tmp_path / 'gen'}/shard-*.jsonl.gz",
                   "data.mix_fraction=0.25", "data.token_field=input_ids"]).data
    data = build_data(cfg, tiny_llama.tokenizer)
    # token_field: the generated ids are read as written (EOS already ends a finished sequence).
    assert data.mix[: len(shard_ids)].tolist()[:50] == shard_ids[:50]
    rows = torch.cat([b for _, b in zip(range(8), (b for _, b in data.batches(4, 32)))])
    mixed = sum(any(torch.equal(r, m) for m in data.mix[: len(data.mix) // 32 * 32].view(-1, 32)) for r in rows)
    assert mixed == 8  # exactly a quarter of 32 sequences
    # One position resumes both streams.
    stream = data.batches(4, 32)
    [next(stream) for _ in range(3)]
    position, fourth = next(stream)
    assert torch.equal(next(data.batches(4, 32, position - 4))[1], fourth)


def test_mix_refuses_bad_settings(tiny_llama):
    cfg = compose(["experiment=tiny", "data.mix_fraction=0.5"]).data
    with pytest.raises(ConfigError, match="mix_path"):
        build_data(cfg, tiny_llama.tokenizer)
    tokens = torch.arange(100)
    data = PackedData(tokens, 0, 0, torch.arange(50), 0.0)
    assert data.mix is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_equals_eager_step(tiny_llama):
    model = tiny_llama.model.cuda()
    try:
        torch.manual_seed(3)
        ids = torch.randint(0, model.config.vocab_size, (4, 30), device="cuda")
        eager, graph = (StaticDecoder(model, 4, 32, cuda_graph=g, bucket=8) for g in (False, True))
        for dec in (eager, graph):
            dec.prefill(ids[:, :10])
        for t in range(10, 30):
            a, b = eager.step(ids[:, t]), graph.step(ids[:, t])
            assert _rel(b, a) < 1e-5, t
        assert sorted(graph._graphs) == [16, 24, 32]  # one graph per bucket of 8 positions reached
    finally:
        model.cpu()
