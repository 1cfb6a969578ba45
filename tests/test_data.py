"""Data: files -> packed sequences, a deterministic order, exact resume from a position, and clear errors."""

import gzip
import json

import pytest
import torch

from distill.config import ConfigError, DataConfig
from distill.data import PackedData, build_data, load_texts, tokenize
from distill.models.teachers.sources import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def write_jsonl(path, texts, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "other": 1}) + "\n")


def test_packing_is_documents_joined_by_eos(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl.gz", ["hello world", "second doc"], gz=True)
    (tmp_path / "b.txt").write_text("plain text line\n")
    texts = load_texts(DataConfig(name="t", path=f"{tmp_path}/a.jsonl.gz"))
    assert texts == ["hello world", "second doc"]
    ids = tokenize(texts, tokenizer)
    eos = tokenizer.eos_token_id
    assert ids.tolist() == tokenizer("hello world")["input_ids"] + [eos] + tokenizer("second doc")["input_ids"] + [eos]
    assert load_texts(DataConfig(name="t", path=str(tmp_path / "b.txt"))) == ["plain text line"]


def test_order_is_deterministic_and_resumes_exactly():
    tokens = torch.randint(0, 100, (10_000,), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    data = PackedData(tokens, holdout_tokens=1000, seed=3)
    stream = data.batches(batch_size=4, seq_len=32)
    first = [next(stream) for _ in range(100)]  # crosses epoch boundaries (281 sequences per epoch)
    again = data.batches(batch_size=4, seq_len=32)
    assert all(torch.equal(b, next(again)[1]) for _, b in first)
    position, _ = first[59]
    resumed = data.batches(batch_size=4, seq_len=32, position=position)
    for _, batch in first[60:]:
        assert torch.equal(next(resumed)[1], batch)
    # Every training sequence appears once per epoch; none comes from the held-out tail.
    epoch = torch.cat([b for _, b in first[: 281 // 4]]).view(-1, 32)
    assert len({tuple(r.tolist()) for r in epoch}) == len(epoch)
    held = set(data.holdout.tolist())
    assert data.train.numel() + data.holdout.numel() == tokens.numel() and len(held) > 0
    assert torch.equal(data.holdout_batches(2, 32, 100)[0][0], tokens[9000:9032])


def test_other_seed_other_order():
    tokens = torch.arange(5000)
    a = next(PackedData(tokens, seed=0).batches(4, 16))[1]
    b = next(PackedData(tokens, seed=1).batches(4, 16))[1]
    assert not torch.equal(a, b)


def test_bundled_sample(tokenizer):
    data = build_data(DataConfig(name="g", path="pkg://gutenberg_sample.jsonl.gz", holdout_tokens=4096), tokenizer)
    assert data.num_sequences(512) > 1000  # ~790 kB of text, one token per byte here


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "does not exist"),
        ("empty.jsonl", "", "cannot read|holds no text"),
        ("blank.jsonl", '{"text": "  "}\n', "holds no text"),
        ("bad.jsonl", "not json\n", "cannot read"),
    ],
)
def test_bad_data_files_are_refused(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_texts(DataConfig(name="x", path=str(tmp_path / name)))


def test_wrong_text_field_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ConfigError, match="data.text_field='body' is not a column"):
        load_texts(DataConfig(name="x", path=str(tmp_path / "a.jsonl"), text_field="body"))


def test_too_little_data_is_refused():
    with pytest.raises(ConfigError, match="fewer than one batch"):
        next(PackedData(torch.arange(100)).batches(4, 64))
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        PackedData(torch.arange(100), holdout_tokens=100)
