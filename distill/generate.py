"""`distill generate`: the teacher writes training text, shard by shard, resumably and deterministically.

A shard is one batch of sequences generated together: `batch_size` prompts (fixed-length prefixes of the data
config's training text, or the chat template's start of an assistant reply), each continued by up to `new_tokens`
sampled tokens (cut after the first EOS). It is written as `shard-NNNNN.jsonl.gz`, one JSON line per sequence with
its `text` and `input_ids` (prompt included) and `prompt_tokens`, so a data config reads it like any other text
(`data.mix_path=OUT/shard-*.jsonl.gz data.token_field=input_ids`).

Shard i is fully determined by the seed and i (its prompts and its sampling generator), so a killed run resumes
from the first missing shard and writes what the uninterrupted run would have written (on the same device and
batch size). Shards are written to a temporary file and renamed; `progress.json` records the shards done.

Llama-family teachers (Llama, SmolLM2, Qwen2) decode through `StaticDecoder`: a static KV cache and one CUDA graph
per step. Other families use the teacher's `generate()`.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import (
    ConfigError, GenerateCommandConfig, check_output_folder, check_seed, device_named, make_folder,
)
from .models.teachers import Teacher, load_teacher
from .models.teachers.decode import FAST_MODEL_TYPES, StaticDecoder, sample

PROGRESS = "progress.json"


def validate_generate(cfg: GenerateCommandConfig) -> None:
    if cfg.prompts not in ("data", "chat"):
        raise ConfigError(f"prompts={cfg.prompts!r}: use data (prefixes of data.path) or chat (the chat template)")
    for key in ("tokens", "new_tokens", "batch_size", "prompt_tokens"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    if cfg.temperature < 0:
        raise ConfigError(f"temperature={cfg.temperature} must be >= 0 (0 is greedy)")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p={cfg.top_p} must be in (0, 1]")
    if cfg.precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision={cfg.precision!r}: use bf16 or fp32")
    check_seed(cfg.seed, "seed")
    check_output_folder(cfg.out, "out")


def _device(name: str) -> torch.device:
    return device_named(name, "device")


class PromptSource:
    """Shard i's prompts: (batch, P) token ids, the same for the same seed and i."""

    def __init__(self, cfg: GenerateCommandConfig, teacher: Teacher):
        self.cfg, self.tokenizer = cfg, teacher.tokenizer
        if cfg.prompts == "chat":
            tok = teacher.tokenizer
            if not getattr(tok, "chat_template", None):
                raise ConfigError("prompts=chat but the teacher's tokenizer has no chat template: use prompts=data")
            ids = tok.apply_chat_template([], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            self.chat = torch.tensor(ids, dtype=torch.long)
        else:
            from .data import build_data

            # Prompts come from the training part of the stream only: the held-out tail stays unseen.
            self.data = build_data(cfg.data, teacher.tokenizer)
            if self.data.num_sequences(cfg.prompt_tokens) < cfg.batch_size:
                raise ConfigError(
                    f"data.path gives fewer than batch_size={cfg.batch_size} prompts of {cfg.prompt_tokens} tokens"
                )

    @property
    def length(self) -> int:
        return len(self.chat) if self.cfg.prompts == "chat" else self.cfg.prompt_tokens

    def shard(self, index: int) -> torch.Tensor:
        b = self.cfg.batch_size
        if self.cfg.prompts == "chat":
            return self.chat.expand(b, -1).clone()
        _, prompts = next(self.data.batches(b, self.cfg.prompt_tokens, position=index * b))
        return prompts


def _cut_at_eos(generated: torch.Tensor, eos: int | None) -> list[list[int]]:
    rows = generated.tolist()
    if eos is None:
        return rows
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


class Generator:
    """Generates shard after shard with one teacher; `run()` resumes from the output folder's progress."""

    def __init__(self, cfg: GenerateCommandConfig):
        validate_generate(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = _device(cfg.device)
        self._check_resume()
        self.teacher = load_teacher(cfg.teacher)
        dtype = torch.bfloat16 if cfg.precision == "bf16" and self.device.type == "cuda" else torch.float32
        self.teacher.model.to(self.device, dtype)
        self.prompts = PromptSource(cfg, self.teacher)
        self.max_len = self.prompts.length + cfg.new_tokens
        if self.max_len > self.teacher.max_positions:
            raise ConfigError(
                f"prompt ({self.prompts.length}) + new_tokens ({cfg.new_tokens}) = {self.max_len} tokens is more "
                f"than the teacher's {self.teacher.max_positions} positions: lower new_tokens"
            )
        self.fast = self.teacher.config.model_type in FAST_MODEL_TYPES
        self.decoder = (
            StaticDecoder(self.teacher.model, cfg.batch_size, self.max_len, cfg.cuda_graph) if self.fast else None
        )

    def _settings(self) -> dict:
        keep = ("prompts", "prompt_tokens", "new_tokens", "batch_size", "temperature", "top_p", "seed", "precision")
        settings = {k: getattr(self.cfg, k) for k in keep}
        settings["teacher"] = asdict(self.cfg.teacher)
        settings["data_path"] = self.cfg.data.path if self.cfg.prompts == "data" else None
        return settings

    def _check_resume(self) -> None:
        """An output folder keeps one generation setting: refuse to extend it with another."""
        path = self.out / PROGRESS
        if path.exists():
            old = self._read_progress()["settings"]
            new = json.loads(json.dumps(self._settings()))
            diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if diffs:
                raise ConfigError(
                    f"out={self.out} was generated with other settings ({', '.join(diffs)} differ): "
                    "use the same settings to extend it, or a new out"
                )

    def _progress(self) -> dict:
        path = self.out / PROGRESS
        if path.exists():
            progress = self._read_progress()
            # A shard counts only if its file is there (the progress file is written after the rename), and only
            # up to the first one missing: shard i is rewritten where it lacks, never a later one in its place.
            present = 0
            while present < len(progress["shards"]) and (self.out / progress["shards"][present]["file"]).exists():
                present += 1
            progress["shards"] = progress["shards"][:present]
            return progress
        return {"settings": self._settings(), "shards": []}

    def _read_progress(self) -> dict:
        path = self.out / PROGRESS
        try:
            progress = json.loads(path.read_text())
            if not isinstance(progress.get("settings"), dict) or not isinstance(progress.get("shards"), list):
                raise ValueError("no settings or shards")
        except (ValueError, AttributeError) as err:
            raise ConfigError(
                f"{path} is damaged ({type(err).__name__}: {err}): delete it and run again to regenerate the "
                "folder's shards (each depends only on the seed and its index, so they come out the same)"
            ) from None
        return progress

    def _write_progress(self, progress: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{PROGRESS}.")
        with os.fdopen(fd, "w") as f:
            json.dump(progress, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.out / PROGRESS)

    @torch.no_grad()
    def generate_shard(self, index: int) -> tuple[torch.Tensor, list[list[int]]]:
        """Prompts (b, P) and each sequence's generated tokens (cut after EOS) for shard `index`."""
        cfg = self.cfg
        prompts = self.prompts.shard(index).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + index)
        eos = self.teacher.tokenizer.eos_token_id
        if not self.fast:
            return prompts, self._generate_hf(prompts, generator, eos)
        out = torch.empty(cfg.batch_size, cfg.new_tokens, dtype=torch.long, device=self.device)
        logits = self.decoder.prefill(prompts)
        done = torch.zeros(cfg.batch_size, dtype=torch.bool, device=self.device)
        steps = 0
        for t in range(cfg.new_tokens):
            token = sample(logits, cfg.temperature, cfg.top_p, generator)
            out[:, t] = token
            steps = t + 1
            if eos is not None:
                done |= token == eos
                # Checking asks the GPU to wait; every 64 steps costs little and stops a finished batch early.
                if t % 64 == 63 and bool(done.all()):
                    break
            if t + 1 < cfg.new_tokens:
                logits = self.decoder.step(token)
        return prompts, _cut_at_eos(out[:, :steps], eos)

    def _generate_hf(self, prompts, generator, eos) -> list[list[int]]:
        cfg = self.cfg
        # generate() samples with the global RNG: seed it from this shard's generator for determinism.
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
        out = self.teacher.model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=cfg.new_tokens,
            do_sample=cfg.temperature > 0,
            temperature=cfg.temperature if cfg.temperature > 0 else None,
            top_p=cfg.top_p if cfg.temperature > 0 else None,
            top_k=0,  # no top-k cut: top_p alone, as on the fast path
            pad_token_id=eos,
        )
        return _cut_at_eos(out[:, prompts.shape[1] :], eos)

    def _write_shard(self, index: int, prompts: torch.Tensor, generated: list[list[int]]) -> dict:
        name = f"shard-{index:05d}.jsonl.gz"
        rows = [p + g for p, g in zip(prompts.tolist(), generated)]
        texts = self.teacher.tokenizer.batch_decode(rows, skip_special_tokens=False)
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt") as f:
            for text, ids in zip(texts, rows):
                f.write(json.dumps({"text": text, "input_ids": ids, "prompt_tokens": prompts.shape[1]}) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes files private; shards are data to share
        os.replace(tmp, self.out / name)
        return {"file": name, "tokens": sum(len(g) for g in generated), "sequences": len(rows)}

    def run(self) -> dict:
        cfg = self.cfg
        make_folder(self.out, "out")
        progress = self._progress()
        self._write_progress(progress)
        done = sum(s["tokens"] for s in progress["shards"])
        bar = tqdm(total=cfg.tokens, initial=min(done, cfg.tokens), unit="tok", unit_scale=True,
                   disable=not cfg.progress, desc="generate", dynamic_ncols=True)
        t0, generated_here = time.perf_counter(), 0
        index = len(progress["shards"])
        # Writing (detokenise, gzip) runs in a thread while the GPU generates the next shard.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            while done < cfg.tokens:
                prompts, generated = self.generate_shard(index)
                if pending is not None:
                    progress["shards"].append(pending.result())
                    self._write_progress(progress)
                pending = pool.submit(self._write_shard, index, prompts.cpu(), generated)
                count = sum(len(g) for g in generated)
                done, generated_here, index = done + count, generated_here + count, index + 1
                rate = generated_here / (time.perf_counter() - t0)
                bar.set_postfix(tok_s=f"{rate:.0f}", shards=index)
                bar.update(min(count, cfg.tokens - bar.n))
            if pending is not None:
                progress["shards"].append(pending.result())
                self._write_progress(progress)
        bar.close()
        seconds = time.perf_counter() - t0
        return {
            "out": str(self.out),
            "shards": len(progress["shards"]),
            "tokens": sum(s["tokens"] for s in progress["shards"]),
            "generated_now": generated_here,
            "seconds": seconds,
            "tokens_per_s": generated_here / seconds if seconds > 0 else 0.0,
        }


def generate(cfg: GenerateCommandConfig) -> dict:
    return Generator(cfg).run()
