"""Atomic checkpoints of a run folder.

A checkpoint is a folder under `run_dir/checkpoints/`: the student's weights (safetensors), the optimizer and
schedule, the RNG states and a small JSON state (stage, step, data position, held-out results). It is written in a
temporary folder and renamed into place; only then does the `latest` file (itself replaced atomically) point at it.
A crash at any moment leaves the previous checkpoint as the latest, whole. A DeepSpeed run (distributed.py) writes
the same files, plus DeepSpeed's own checkpoint in a `deepspeed/` sub-folder, through the same steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file

from .config import ConfigError

LATEST = "latest"


@dataclass
class RunState:
    """Where a run stands: enough to resume it exactly."""

    stage_index: int = 0  # index into the pipeline of the stage in progress (or next, if stage_done)
    step: int = 0  # optimizer steps done in that stage
    stage_done: bool = False
    position: int = 0  # sequences of the data stream consumed by that stage
    tokens: int = 0  # tokens trained on in that stage
    results: dict = field(default_factory=dict)  # per-stage summaries and held-out perplexities so far


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(final: Path, prefix: str, tmp: Path | None = None):
    """Yield a temporary folder beside `final`, to be filled; then it replaces `final` whole in one rename. On any
    failure it is removed and `final` is left as it was. `tmp`: an existing temporary folder to finish this way
    (one that other processes have written into) instead of a new one."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix)) if tmp is None else tmp
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, name: str, model, optimizer_state: dict | None, state: RunState, keep: int = 2):
    """Write checkpoint `name` atomically, point `latest` at it, then prune all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    with atomic_folder(final, prefix=".tmp-") as tmp:
        write_files(tmp, model_weights(model), optimizer_state, state)
    point_latest(root, name, keep)
    return final


def write_files(folder: Path, weights: dict[str, torch.Tensor], optimizer_state: dict | None, state: RunState):
    """A checkpoint's files: weights (model.safetensors), trainer.pt (optimizer, schedule, RNG), state.json."""
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"optimizer": optimizer_state, "rng": rng_state()}, folder / "trainer.pt")
    (folder / "state.json").write_text(json.dumps(asdict(state), indent=1))


def point_latest(root: Path, name: str, keep: int) -> None:
    """`latest` names checkpoint `name` (replaced atomically); all but the newest `keep` checkpoints are removed."""
    _atomic_write_text(root / LATEST, name)
    checkpoints = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_order)
    for old in checkpoints[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):  # from a crash in an earlier run
        shutil.rmtree(leftover, ignore_errors=True)


def model_weights(model) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, each stored once: a tied weight (the LM head sharing the embeddings) keeps its
    first name, and `load_model` restores the tie. Copies, because DeepSpeed's ZeRO turns parameters into views of
    one flat buffer, which safetensors refuses to save as is."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def _order(path: Path) -> float:
    return path.stat().st_mtime


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def load_checkpoint(folder: Path, model) -> tuple[RunState, dict]:
    """Load weights into `model`; return the run state and the trainer payload (optimizer state, RNG)."""
    check_fits(folder, model)
    load_model(model, str(folder / "model.safetensors"), strict=False)
    state = RunState(**json.loads((folder / "state.json").read_text()))
    payload = torch.load(folder / "trainer.pt", weights_only=False)
    return state, payload


def check_fits(folder: Path, model) -> None:
    """Refuse a checkpoint written for another student (other layers, another mixer form or size) before loading
    anything: one line that names the differences and what to do."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    tensors = model.state_dict()
    own = {k: tuple(v.shape) for k, v in tensors.items()}
    # A tied weight is stored once, under the first of its names: its other names are not missing.
    storage = lambda t: (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
    stored = {storage(tensors[k]) for k in own if k in saved}
    missing = sorted(k for k in own if k not in saved and storage(tensors[k]) not in stored)
    unexpected = sorted(set(saved) - set(own))
    resized = sorted(k for k in set(own) & set(saved) if own[k] != saved[k])
    if missing or unexpected or resized:
        found = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]
        found.append(f"{resized[0]} is {list(saved[resized[0]])}, not {list(own[resized[0]])}" if resized else "")
        raise ConfigError(
            f"checkpoint {folder} does not fit this student ({'; '.join(x for x in found if x)}): the student config "
            "differs from the run's; use the run's config or a new run_dir"
        )
