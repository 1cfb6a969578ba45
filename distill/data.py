"""Text -> token ids -> packed fixed-length sequences, in a deterministic, resumable order.

Documents are read through `datasets` (local json/jsonl/txt files, gzip'ed or not, or a hub dataset), tokenized with
the teacher's tokenizer, joined with EOS between documents and cut into sequences of `seq_len` tokens. The last
`holdout_tokens` of the stream are kept apart for held-out perplexity. A position (the number of sequences consumed)
is all a checkpoint needs to resume the stream exactly.

A second source can be mixed in (`data.mix_path`, e.g. the shards `distill generate` writes): a fixed fraction of
the training sequences come from it, interleaved deterministically, so one position still resumes both streams.
Held-out perplexity is always measured on the primary source.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ConfigError, DataConfig
from .data_check import file_problem

PACKAGE_PREFIX = "pkg://"


def resolve_files(path: str, key: str = "data.path") -> list[str] | None:
    """The local files named by `path` (comma-separated, globs, pkg:// for packaged files), or None for a hub name."""
    files: list[str] = []
    for part in (p.strip() for p in path.split(",") if p.strip()):
        if part.startswith(PACKAGE_PREFIX):
            part = str(Path(__file__).parent / "data_files" / part[len(PACKAGE_PREFIX) :])
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        local = [m for m in matches if Path(m).exists()]
        folder = next((m for m in local if Path(m).is_dir()), None)
        if folder is not None:
            raise ConfigError(f"{key}: {folder!r} is a folder: name its files, e.g. {key}={folder}/*.jsonl")
        if not local:
            looks_local = part.startswith((".", "/", "~")) or Path(part).suffix in (".json", ".jsonl", ".txt", ".gz")
            if looks_local or len(files):
                raise ConfigError(f"{key}: {part!r} does not exist; give an existing file or a hub dataset name")
            return None
        files += local
    return files


@contextlib.contextmanager
def _loader_errors_held_back():
    """datasets' JSON loader logs a parse error (with its traceback) before it raises; the error distill raises
    names the file, the line and what is wrong in one line, so that log is held back while local files load. (It
    also went to whatever stream the logger's handler first saw: under pytest a closed one, a "Logging error".)"""
    log = logging.getLogger("datasets.packaged_modules.json.json")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _load_dataset(path: str, cfg: DataConfig, key: str = "data.path"):
    import datasets

    files = resolve_files(path, key)
    try:
        if files is None:
            ds = datasets.load_dataset(path, cfg.hub_config, split=cfg.split)
        else:
            is_text = all(f.removesuffix(".gz").endswith(".txt") for f in files)
            with _loader_errors_held_back():
                ds = datasets.load_dataset("text" if is_text else "json", data_files=files, split="train")
    except Exception as err:  # datasets raises many types; all mean the same to the user
        raise ConfigError(f"cannot read {key}={path!r}: {_why(err, files, cfg.text_field)}") from err
    is_text = files is not None and all(f.removesuffix(".gz").endswith(".txt") for f in files)
    return ds, is_text, files


def _column(ds, name: str, path: str, key: str, files: list[str] | None, field: str) -> list:
    """A column's values. pyarrow keeps JSON strings that are not UTF-8 as they are, and fails only here."""
    try:
        return list(ds[name])
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read {key}={path!r}: {_why(err, files, field)}") from None


def _why(err: Exception, files: list[str] | None, field: str) -> str:
    """What is wrong, for the message: the first local file whose contents are at fault and how (data_check.py),
    else the innermost error datasets raised (its outer ones say only that generating the dataset failed)."""
    for name in files or []:
        problem = file_problem(name, name.removesuffix(".gz").endswith(".txt"), field)
        if problem:
            return f"{name} {problem}"
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def load_texts(cfg: DataConfig, path: str | None = None, key: str = "data.path") -> list[str]:
    """The documents of the data config (or of another `path` read the same way), in file order."""
    path = path or cfg.path
    ds, is_text, files = _load_dataset(path, cfg, key)
    field = "text" if is_text else cfg.text_field
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of {path!r}: {ds.column_names}")
    column = _column(ds, field, path, key, files, field)
    wrong = next((t for t in column if t is not None and not isinstance(t, str)), None)
    if wrong is not None:
        raise ConfigError(
            f"{key}={path!r}: field {field!r} holds {type(wrong).__name__} values ({str(wrong)[:40]}), not text: set "
            "data.text_field to the column holding the documents' text"
        )
    texts = [t for t in column if t and t.strip()]
    if not texts:
        raise ConfigError(f"{key}={path!r} holds no text in field {field!r}")
    return texts


def load_tokens(cfg: DataConfig, tokenizer, path: str | None = None, key: str = "data.path") -> torch.Tensor:
    """One token stream from `path` (default data.path): pre-tokenized ids where the files have data.token_field
    (as `distill generate` writes them), else the text tokenized by the teacher's tokenizer; EOS between documents."""
    path = path or cfg.path
    if cfg.token_field:
        ds, is_text, files = _load_dataset(path, cfg, key)
        if not is_text and cfg.token_field in ds.column_names:
            eos = tokenizer.eos_token_id
            ids: list[int] = []
            for doc in _column(ds, cfg.token_field, path, key, files, cfg.text_field):
                if not isinstance(doc, list) or not all(isinstance(i, int) for i in doc[:1]):
                    raise ConfigError(
                        f"{path!r}: data.token_field={cfg.token_field!r} holds {type(doc).__name__} values, not lists "
                        "of token ids: name the column of ids (`distill generate` writes input_ids), or set "
                        "data.token_field='' to tokenize the text"
                    )
                ids.extend(doc)
                if not doc or doc[-1] != eos:
                    ids.append(eos)
            tokens = torch.tensor(ids, dtype=torch.int64)
            vocab = len(tokenizer)
            if len(tokens) and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
                bad = int(tokens.max()) if int(tokens.max()) >= vocab else int(tokens.min())
                raise ConfigError(
                    f"{path!r}: data.token_field={cfg.token_field!r} holds token id {bad}, outside "
                    f"the teacher's vocabulary of {vocab}: these ids come from another tokenizer; set data.token_field="
                    "'' to tokenize the text instead"
                )
            return tokens
    return tokenize(load_texts(cfg, path, key), tokenizer)


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

    def __init__(
        self,
        tokens: torch.Tensor,
        holdout_tokens: int = 0,
        seed: int = 0,
        mix_tokens: torch.Tensor | None = None,
        mix_fraction: float = 0.0,
    ):
        if holdout_tokens >= len(tokens):
            raise ConfigError(
                f"data.holdout_tokens={holdout_tokens} leaves nothing to train on ({len(tokens)} tokens): lower it"
            )
        split = len(tokens) - holdout_tokens
        self.train, self.holdout, self.seed = tokens[:split], tokens[split:], seed
        self.mix, self.mix_fraction = (mix_tokens, mix_fraction) if mix_fraction > 0 else (None, 0.0)

    def num_sequences(self, seq_len: int) -> int:
        return len(self.train) // seq_len

    def _source_index(self, p: int) -> tuple[int, int]:
        """(source, index within that source's stream) of global sequence p: sequence p comes from the mixed-in
        source when floor((p + 1) f) > floor(p f), which puts exactly floor(p f) of the first p sequences there."""
        f = self.mix_fraction
        if not f:
            return 0, p
        before = math.floor(p * f)
        return (1, before) if math.floor((p + 1) * f) > before else (0, p - before)

    def batches(self, batch_size: int, seq_len: int, position: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (position after this batch, LongTensor (batch_size, seq_len)), starting at sequence `position`.

        Each source's stream is an endless sequence of epochs, each a fresh seeded permutation of its sequences.
        """
        streams = [self.train] + ([self.mix] if self.mix is not None else [])
        names = ["data.path", "data.mix_path"]
        sequences, orders = [], [{}, {}]
        for stream, name in zip(streams, names):
            n = len(stream) // seq_len
            if n < (batch_size if name == "data.path" and self.mix is None else 1):
                raise ConfigError(
                    f"{name} gives {n} sequences of {seq_len} tokens, fewer than one batch of {batch_size}: "
                    "use more data or a smaller batch_size/seq_len"
                )
            sequences.append(stream[: n * seq_len].view(n, seq_len))

        def row(source: int, index: int) -> torch.Tensor:
            n = len(sequences[source])
            epoch, i = divmod(index, n)
            cache = orders[source]
            if epoch not in cache:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + source * 7_919)
                cache.clear()
                cache[epoch] = torch.randperm(n, generator=g)
            return sequences[source][cache[epoch][i]]

        while True:
            rows = [row(*self._source_index(p)) for p in range(position, position + batch_size)]
            position += batch_size
            yield position, torch.stack(rows)

    def holdout_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
        n = len(self.holdout) // seq_len
        if n == 0:
            raise ConfigError(
                f"data.holdout_tokens={len(self.holdout)} is less than one sequence of {seq_len}: raise it"
            )
        sequences = self.holdout[: n * seq_len].view(n, seq_len)
        return [sequences[i : i + batch_size] for i in range(0, n, batch_size)][:max_batches]


def build_data(cfg: DataConfig, tokenizer) -> PackedData:
    if not 0.0 <= cfg.mix_fraction <= 1.0:
        raise ConfigError(f"data.mix_fraction={cfg.mix_fraction} must be between 0 and 1")
    if cfg.mix_fraction > 0 and not cfg.mix_path:
        raise ConfigError("data.mix_fraction > 0 needs data.mix_path (e.g. the shards of `distill generate`)")
    mix = load_tokens(cfg, tokenizer, cfg.mix_path, "data.mix_path") if cfg.mix_fraction > 0 else None
    return PackedData(load_tokens(cfg, tokenizer), cfg.holdout_tokens, cfg.seed, mix, cfg.mix_fraction)
