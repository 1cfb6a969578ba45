"""Atomic, verifiable checkpoints of a run folder.

A checkpoint is a folder under `run_dir/checkpoints/`: the student's weights (safetensors), the optimizer and
schedule, the RNG states and a small JSON state (stage, step, data position, held-out results). It is written in a
temporary folder and renamed into place; only then does the `latest` file (itself replaced atomically) point at it.
A crash at any moment leaves the previous checkpoint as the latest, whole. A DeepSpeed run (distributed.py) writes
the same files, plus DeepSpeed's own checkpoint in a `deepspeed/` sub-folder, through the same steps.

The last file written into the temporary folder is `manifest.json`: the size and SHA-256 of every other file, each
flushed to disk as it is hashed. A checkpoint damaged afterwards (a partial copy, a full or failing disk) is found
by `damage` before anything is loaded: a resume goes on from the newest intact checkpoint and says which it passed
over (`resume_point`), and the commands that read a run (export, eval, inspect) name the damaged file
(`readable_checkpoint`). Pruning counts only intact checkpoints, so it never deletes the one a resume falls back to.
Checkpoints written before manifests existed are checked by their structure instead (the safetensors header against
the file's size, trainer.pt's zip directory, state.json's JSON), which finds a truncated file but not a changed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import struct
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file

from .config import ConfigError

LATEST = "latest"
MANIFEST = "manifest.json"
BLOCK = 1 << 20  # files are hashed 1 MiB at a time: memory stays flat whatever a checkpoint weighs
READ_BY_COMMANDS = ("model.safetensors", "state.json")  # what export, eval and inspect load from a checkpoint


@dataclass
class RunState:
    """Where a run stands: enough to resume it exactly."""

    stage_index: int = 0  # index into the pipeline of the stage in progress (or next, if stage_done)
    step: int = 0  # optimizer steps done in that stage
    stage_done: bool = False
    position: int = 0  # sequences of the data stream consumed by that stage
    tokens: int = 0  # tokens trained on in that stage
    results: dict = field(default_factory=dict)  # per-stage summaries and held-out perplexities so far


def atomic_write_text(path: Path, text: str) -> None:
    """`path` holds `text` whole, or its old contents: written beside it, flushed, renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes files private; a run's files are to be read by others
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (where the platform allows a folder to be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        _fsync_dir(final.parent)
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
    """A checkpoint's files: weights (model.safetensors), trainer.pt (optimizer, schedule, RNG), state.json, and last
    manifest.json, which covers these and whatever else the folder holds already (DeepSpeed's files)."""
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"optimizer": optimizer_state, "rng": rng_state()}, folder / "trainer.pt")
    (folder / "state.json").write_text(json.dumps(asdict(state), indent=1))
    write_manifest(folder)


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: {file: {bytes, sha256}} of every file under `folder`, each flushed to disk on the way, so the
    rename that publishes the folder comes after its contents are durable."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)} for p in files
    }
    with open(folder / MANIFEST, "w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in {p.parent for p in files} | {folder}:
        _fsync_dir(sub)


def point_latest(root: Path, name: str, keep: int) -> None:
    """`latest` names checkpoint `name` (replaced atomically); then checkpoints older than it are pruned so that it
    and the newest `keep` - 1 intact ones before it remain (keep=0: none is removed).

    Only checkpoints that pass the cheap check (sizes against their manifest, or a legacy checkpoint's structure)
    count: a damaged one never pushes out the intact checkpoint a resume would fall back to. What lies behind the
    oldest one kept goes, damaged or not (no resume reaches it, and a prune killed half-way leaves such remains);
    a damaged one between the kept ones stays for a resume to report. Checkpoints ahead of `name` are ones a
    resume passed over as damaged: the run rewrites them by name as it gets there."""
    atomic_write_text(root / LATEST, name)
    if keep > 0:
        current = _progress(root / name)
        older = [c for c in checkpoints(root) if c.name != name and _progress(c) < current]  # newest first
        kept = [c for c in older if damage(c, check_hashes=False) is None][: keep - 1]
        floor = _progress(kept[-1]) if kept else current
        for old in older:
            if _progress(old) < floor:
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


def _progress(folder: Path) -> tuple:
    """How far the run had got at checkpoint `folder` (stage, step, done), then its time: the order of a run's
    checkpoints that survives copying (a copy's times are the copy's). Unreadable state: after all others, so
    that the first look finds it damaged and says so, and pruning never counts it as an older one."""
    try:
        state = json.loads((folder / "state.json").read_text())
        at = (int(state["stage_index"]), int(state["step"]), bool(state["stage_done"]))
    except (OSError, ValueError, KeyError, TypeError):
        at = (math.inf, math.inf, True)
    try:
        return (*at, folder.stat().st_mtime)
    except OSError:
        return (*at, 0.0)


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (run_dir/checkpoints), newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=_progress, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names (None: none, or it is gone), as written; `resume_point` and
    `readable_checkpoint` are the ones that check it."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def damage(folder: Path, files: tuple[str, ...] | None = None, check_hashes: bool = True) -> str | None:
    """What is wrong with checkpoint `folder`, naming the file ("model.safetensors is 1000 bytes, its manifest says
    751920"); None if it is whole. `files`: only these (default: every file of the manifest). `check_hashes`: also
    compare SHA-256 sums (reads every byte: about 1 s per 540 MB on one core of a 2-core EPYC), else sizes only.
    A checkpoint without a manifest (written before them) is checked by its structure."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return _legacy_damage(folder, files or ("model.safetensors", "trainer.pt", "state.json"))
    try:
        listed = json.loads(manifest_path.read_text())["files"]
        for entry in listed.values():
            int(entry["bytes"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is damaged"
    names = list(listed) if files is None else list(files)
    for name in names:
        path = folder / name
        if name not in listed:
            return f"{name} is not in its {MANIFEST}"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != listed[name]["bytes"]:
            return f"{name} is {size} bytes, its {MANIFEST} says {listed[name]['bytes']}"
    if check_hashes:
        for name in names:
            if _sha256(folder / name) != listed[name]["sha256"]:
                return f"{name} does not match its SHA-256 in {MANIFEST} (its bytes have changed)"
    return None


def _legacy_damage(folder: Path, files: tuple[str, ...]) -> str | None:
    for name in files:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if name == "state.json":
            try:
                state = json.loads(path.read_text())
                RunState(**state)
            except (OSError, ValueError, TypeError):
                return "state.json is damaged (not the JSON of a run state)"
        elif name == "model.safetensors":
            why = _safetensors_damage(path)
            if why:
                return f"model.safetensors {why}"
        elif name == "trainer.pt" and not zipfile.is_zipfile(path):  # torch.save writes a zip; its index is at the end
            return "trainer.pt is damaged or cut short (no zip directory at its end)"
    return None


def _safetensors_damage(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes: the header's largest
    data offset says how long the whole file must be."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                return f"is cut short ({size} bytes, less than its header)"
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return "is damaged (no readable safetensors header)"
    if 8 + length + end != size:
        return f"is {size} bytes, its header says {8 + length + end}"
    return None


def resume_point(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint a resumed run goes on from: the newest intact one (every file verified), and a line per
    checkpoint passed over saying what is wrong with it. (None, []): no checkpoint yet, the run starts."""
    root = Path(run_dir) / "checkpoints"
    found = checkpoints(root)
    if not found:
        return None, []
    passed = []
    for folder in found:
        why = damage(folder)
        if why is None:
            return folder, passed
        passed.append(f"{folder.name}: {why}")
    raise ConfigError(
        f"every checkpoint in {root} is damaged ({'; '.join(passed[:3])}): restore them (copy the run folder "
        "again), or remove that folder to start the run over"
    )


def readable_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint, for the commands that read a run (export, eval, inspect): verified where they
    read it; a damaged one is refused with its file named and the ways on (None: the run has no checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    found = checkpoints(root)
    if not found:
        return None
    why = damage(found[0], READ_BY_COMMANDS)
    if why is None:
        return found[0]
    intact = next((c for c in found[1:] if damage(c, READ_BY_COMMANDS) is None), None)
    if intact is None:
        raise ConfigError(f"checkpoint {found[0]} is damaged ({why}) and no intact one is left: restore the run "
                          "folder from a copy")
    raise ConfigError(
        f"checkpoint {found[0]} is damaged ({why}): run `distill train` again with the run's overrides to redo the "
        f"steps since {intact.name}, the newest intact checkpoint, or give checkpoint={intact} to use that one as it is"
    )


def verify_checkpoint(folder: Path) -> None:
    """Refuse a checkpoint folder named directly (checkpoint=RUN/checkpoints/NAME) if it is damaged."""
    why = damage(folder, READ_BY_COMMANDS)
    if why is not None:
        raise ConfigError(f"checkpoint {folder} is damaged ({why}): choose another in {Path(folder).parent}")


def load_checkpoint(folder: Path, model, trainer_state: bool = True) -> tuple[RunState, dict | None]:
    """Load weights into `model`; return the run state and the trainer payload (optimizer state, RNG), which only a
    resume needs (`trainer_state=False`: None)."""
    check_fits(folder, model)
    load_model(model, str(folder / "model.safetensors"), strict=False)
    state = RunState(**json.loads((folder / "state.json").read_text()))
    payload = torch.load(folder / "trainer.pt", weights_only=False) if trainer_state else None
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
