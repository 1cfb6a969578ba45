"""Shared fixtures: tiny random teachers built in memory, composing configs the way the CLI does, and waiting for a
run's checkpoint in the kill-and-resume tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be switched on before triton is first
    # imported (transformers imports it), so here, before anything else.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from distill.cli import compose
from distill.config import TeacherConfig, config_dir  # noqa: E402
from distill.models.teachers import load_teacher  # noqa: E402

# Under pytest-xdist (`-n N`, the README's test command) each worker takes its share of the cores: OpenMP threads
# beyond the cores spin at their barriers, which made a 2-core run several times slower, not faster.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the subprocesses tests launch, likewise


def teacher_config(name: str) -> TeacherConfig:
    yaml = OmegaConf.load(config_dir() / "teacher" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TeacherConfig), yaml))


@pytest.fixture(scope="session")
def tiny_llama():
    return load_teacher(teacher_config("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_phi():
    return load_teacher(teacher_config("tiny-phi"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(source model, path): a tiny random Llama written as a float32 GGUF file (tests/gguf_writer.py)."""
    from tests.gguf_writer import write_tiny_llama_gguf

    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(params=["tiny-llama", "tiny-phi"])
def tiny_teacher(request, tiny_llama, tiny_phi):
    return {"tiny-llama": tiny_llama, "tiny-phi": tiny_phi}[request.param]


@pytest.fixture
def tiny_cfg(tmp_path):
    """Compose the tiny experiment into a fresh run folder, with extra overrides."""

    def make(*overrides: str):
        return compose(["experiment=tiny", f"run_dir={tmp_path / 'run'}", *overrides])

    return make


def wait_for_checkpoint(proc, run_dir, prefix: str, timeout: float = 120.0) -> None:
    """Poll until the run's `latest` checkpoint name starts with `prefix`, or `proc` ends, or `timeout` passes (the
    caller asserts the process is still there to be killed)."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().startswith(prefix):
            return
        time.sleep(0.02)
