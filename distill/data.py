"""Text -> token ids -> packed fixed-length sequences, in a deterministic, resumable order.

Documents are read through `datasets` (local json/jsonl/txt files, gzip'ed or not, or a hub dataset), tokenized with
the teacher's tokenizer, joined with EOS between documents and cut into sequences of `seq_len` tokens. The last
`holdout_tokens` of the stream are kept apart for held-out perplexity. A position (the number of sequences consumed)
is all a checkpoint needs to resume the stream exactly.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ConfigError, DataConfig

PACKAGE_PREFIX = "pkg://"


def resolve_files(path: str) -> list[str] | None:
    """The local files named by `path` (comma-separated, globs, pkg:// for packaged files), or None for a hub name."""
    files: list[str] = []
    for part in (p.strip() for p in path.split(",") if p.strip()):
        if part.startswith(PACKAGE_PREFIX):
            part = str(Path(__file__).parent / "data_files" / part[len(PACKAGE_PREFIX) :])
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        local = [m for m in matches if Path(m).exists()]
        if not local:
            looks_local = part.startswith((".", "/", "~")) or Path(part).suffix in (".json", ".jsonl", ".txt", ".gz")
            if looks_local or len(files):
                raise ConfigError(f"data.path: {part!r} does not exist; give an existing file or a hub dataset name")
            return None
        files += local
    return files


def load_texts(cfg: DataConfig) -> list[str]:
    """The documents of the data config, in file order."""
    import datasets

    files = resolve_files(cfg.path)
    try:
        if files is None:
            ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split)
        else:
            is_text = all(f.removesuffix(".gz").endswith(".txt") for f in files)
            ds = datasets.load_dataset("text" if is_text else "json", data_files=files, split="train")
    except Exception as err:  # datasets raises many types; all mean the same to the user
        raise ConfigError(f"cannot read data.path={cfg.path!r}: {type(err).__name__}: {err}") from err
    field = "text" if files is not None and all(f.removesuffix(".gz").endswith(".txt") for f in files) else None
    field = field or cfg.text_field
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.path!r}: {ds.column_names}")
    texts = [t for t in ds[field] if t and t.strip()]
    if not texts:
        raise ConfigError(f"data.path={cfg.path!r} holds no text in field {field!r}")
    return texts


def tokenize(texts: list[str], tokenizer) -> torch.Tensor:
    """One stream of token ids: each document followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the teacher's tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for doc in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


class PackedData:
    """A token stream cut into sequences; batches come in a seeded order, epoch after epoch."""

    def __init__(self, tokens: torch.Tensor, holdout_tokens: int = 0, seed: int = 0):
        if holdout_tokens >= len(tokens):
            raise ConfigError(
                f"data.holdout_tokens={holdout_tokens} leaves nothing to train on ({len(tokens)} tokens): lower it"
            )
        split = len(tokens) - holdout_tokens
        self.train, self.holdout, self.seed = tokens[:split], tokens[split:], seed

    def num_sequences(self, seq_len: int) -> int:
        return len(self.train) // seq_len

    def batches(self, batch_size: int, seq_len: int, position: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (position after this batch, LongTensor (batch_size, seq_len)), starting at sequence `position`.

        Sequence `position` is the n-th of an endless sequence of epochs, each a fresh seeded permutation.
        """
        n = self.num_sequences(seq_len)
        if n < batch_size:
            raise ConfigError(
                f"the data gives {n} sequences of {seq_len} tokens, fewer than one batch of {batch_size}: "
                "use more data or a smaller batch_size/seq_len"
            )
        sequences = self.train[: n * seq_len].view(n, seq_len)
        order_epoch, order = -1, None
        while True:
            rows = []
            for p in range(position, position + batch_size):
                epoch, index = divmod(p, n)
                if epoch != order_epoch:
                    g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                    order, order_epoch = torch.randperm(n, generator=g), epoch
                rows.append(order[index])
            position += batch_size
            yield position, sequences[torch.stack(rows)]

    def holdout_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
        n = len(self.holdout) // seq_len
        if n == 0:
            raise ConfigError(
                f"data.holdout_tokens={len(self.holdout)} is less than one sequence of {seq_len}: raise it"
            )
        sequences = self.holdout[: n * seq_len].view(n, seq_len)
        return [sequences[i : i + batch_size] for i in range(0, n, batch_size)][:max_batches]


def build_data(cfg: DataConfig, tokenizer) -> PackedData:
    return PackedData(tokenize(load_texts(cfg), tokenizer), cfg.holdout_tokens, cfg.seed)
