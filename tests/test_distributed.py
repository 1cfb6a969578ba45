"""DeepSpeed ZeRO over two CPU processes (gloo), launched by torchrun: ZeRO-2 and ZeRO-3 give the run of one process
at the same global batch, a ZeRO-3 teacher gives the outputs of a whole one, checkpoints resume after a kill on
another number of processes (and exactly on the same one), and bad settings stop with one line.

Run as a script under torchrun (`torchrun --nproc_per_node=2 tests/test_distributed.py teacher OUT`), this file is
also the per-rank side of the teacher test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("deepspeed") is None:  # found, not imported: the launched processes import it
    pytest.skip("deepspeed is not installed (pip install -e '.[test]')", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from distill.checkpoint import latest_checkpoint  # noqa: E402
from distill.cli import main  # noqa: E402

# fp32: ranks add their rows' gradients in another order than one process does, which bf16 would blur past 1e-4.
# ZeRO-3 partitions every parameter (threshold 0), not only those above DeepSpeed's default 100k elements (all of
# the tiny teacher's would stay whole), so the parameters the stages read outside a forward are exercised too.
BASE = ["experiment=tiny", "trainer.precision=fp32", "trainer.keep_checkpoints=10"]
ZERO3 = ["trainer=zero3", "trainer.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
# The launched processes import this checkout's distill, whatever else is installed (a script's sys.path starts at
# tests/, not the repository root).
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
# The README's `--dist loadfile` runs this file on one xdist worker: the module's runs below are made once.


def torchrun(*args: str, procs: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]


def train(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """`distill train` on two processes."""
    command = torchrun("-m", "distill", "train", *BASE, f"run_dir={run_dir}", *overrides)
    out = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "step" in r]


def assert_close(a: list, b: list, rel: float = 1e-4) -> None:
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for (stage, step, x), (_, _, y) in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (stage, step, x, y)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", *BASE, f"run_dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """Two processes, ZeRO-3 student and ZeRO-3 teacher, a checkpoint every 4 steps (all kept)."""
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    train(run_dir, *ZERO3, "trainer.checkpoint_every=4")
    return run_dir


def test_zero2_and_zero3_on_two_processes_equal_one_process(one_process, zero3_run, tmp_path):
    """ZeRO-2 launched by `deepspeed --num_gpus 2 --no_local_rank --module distill train ...` (the README's other
    launch) and ZeRO-3 by torchrun both compute the one-process run."""
    launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not on PATH: pip install -e '.[test]' puts it there"
    command = [launcher, "--num_gpus", "2", "--no_local_rank", "--module", "distill", "train", *BASE,
               f"run_dir={tmp_path / 'zero2'}", "trainer=zero2"]
    out = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one = losses(one_process)
    assert len(one) == 24  # 8 steps in each of the 3 stages
    assert_close(losses(tmp_path / "zero2"), one)
    assert_close(losses(zero3_run), one)
    # The consolidated weights gathered from the ZeRO-3 partitions are the one-process run's, under the same names
    # (the tied LM head stored once).
    a = load_file(latest_checkpoint(one_process) / "model.safetensors")
    b = load_file(latest_checkpoint(zero3_run) / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    # Each checkpoint also holds DeepSpeed's own, one optimizer partition per process.
    ds = latest_checkpoint(zero3_run) / "deepspeed"
    assert json.loads((ds / "distill.json").read_text())["world_size"] == 2
    assert len(list((ds / "zero").glob("*optim_states.pt"))) == 2
    # `distill export` reads the two-process ZeRO-3 run folder as any other: the export holds the gathered weights.
    assert main(["export", f"checkpoint={zero3_run}", f"out={tmp_path / 'export'}"]) == 0
    exported = load_file(tmp_path / "export" / "model.safetensors")
    for name, tensor in b.items():
        assert torch.equal(exported[name].float(), tensor.float()), name


def test_an_offloaded_optimizer_steps_through_deepspeeds_cpu_adam():
    """With zero_optimization.offload_optimizer, trainer.optimizer=auto resolves to DeepSpeed's CPU Adam (DeepSpeed
    steps an offloaded optimizer through it); without, to torch's AdamW. The run itself, which builds CPU Adam's C++
    op, is the `compiles` test below."""
    from types import SimpleNamespace

    from distill.distributed import optimizer_kind

    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert optimizer_kind(SimpleNamespace(optimizer="auto", deepspeed=offload)) == "cpu_adam"
    assert optimizer_kind(SimpleNamespace(optimizer="auto", deepspeed={"zero_optimization": {"stage": 2}})) == \
        "torch_adamw"
    assert optimizer_kind(SimpleNamespace(optimizer="fused_adam", deepspeed=offload)) == "fused_adam"


@pytest.mark.compiles
def test_optimizer_offload_runs_deepspeeds_cpu_adam(one_process, tmp_path):
    """zero_optimization.offload_optimizer keeps Adam on the CPU through DeepSpeed's CPU Adam (trainer.optimizer=auto
    picks it; a C++ op built on first use, 3.3 minutes of a 2-core EPYC, then cached): the one-process run's losses.
    Left out of the default run (pyproject's addopts); `python -m pytest -m compiles` runs it."""
    train(tmp_path / "run", "trainer=zero2", "+trainer.deepspeed.zero_optimization.offload_optimizer.device=cpu")
    assert_close(losses(tmp_path / "run"), losses(one_process))


def test_a_zero3_teacher_gives_the_outputs_of_a_whole_one(tmp_path):
    out = subprocess.run(torchrun(__file__, "teacher", str(tmp_path)), capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["partitioned"]  # every weight of the model is a partition (empty here), not a copy
        assert result["max_difference"] == 0.0, result  # the same weights, gathered: the same numbers


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "X"


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through Linux's /proc")
def test_kill_and_resume_on_one_process_and_on_two(zero3_run, tmp_path, capfd):
    """SIGKILL a two-process run in stage 2; resumed on one process it goes on from the consolidated checkpoint with
    fresh optimizer moments; resumed on two it reloads DeepSpeed's own checkpoint and ends as if never stopped."""
    from tests.conftest import wait_for_checkpoint  # here: this file also runs as a torchrun script

    killed = tmp_path / "killed"
    command = torchrun("-m", "distill", "train", *BASE, f"run_dir={killed}", *ZERO3, "trainer.checkpoint_every=4")
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(proc, killed, "stage2-step")
    assert proc.poll() is None, "the run ended before it could be killed"
    # torchrun starts each rank in a session of its own: kill the ranks by their ids, then the launcher.
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2
    for pid in [*ranks, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in ranks):
        time.sleep(0.01)
    assert latest_checkpoint(killed).name == "stage2-step000004"
    shutil.copytree(killed, tmp_path / "killed2")
    whole = losses(zero3_run)

    assert main(["train", *BASE, f"run_dir={killed}", "trainer.checkpoint_every=4"]) == 0
    assert "stage2: resuming at step 4 with fresh optimizer moments" in capfd.readouterr().out
    resumed = losses(killed)
    assert_close(resumed[:13], whole[:13])  # stage 1, stage 2 to step 4, and step 5: the same weights and data
    assert [r[:2] for r in resumed] == [r[:2] for r in whole]  # no step lost or repeated in the log
    assert latest_checkpoint(killed).name == "stage3-done"

    train(tmp_path / "killed2", *ZERO3, "trainer.checkpoint_every=4")
    assert_close(losses(tmp_path / "killed2"), whole, rel=1e-6)  # DeepSpeed's moments reloaded: the same run


def test_a_checkpoint_of_another_student_is_refused_under_zero(zero3_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_run / "checkpoints", run_dir / "checkpoints")
    out = train(run_dir, *ZERO3, "student.attention_layers=[2]", check=False)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("distill: error:")]
    assert errors and "does not fit this student (missing ['model.layers.1.self_attn." in errors[0]
    assert "use the run's config or a new run_dir" in errors[0]


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (2, ["stages.stage1.batch_size=3"], "stages.stage1.batch_size=3 is the global batch and must divide by the 2"),
        (4, ["trainer=zero3"], "stages.stage1.batch_size=2 is the global batch, split by rows over the 4 processes"),
        (2, ["+trainer.deepspeed.fp16.enabled=true"], "fp16.enabled=true on the CPU, which has no fp16 training"),
        (2, ["+trainer.deepspeed.train_batch_size=8"], "trainer.deepspeed.train_batch_size: distill sets it"),
        (2, ["+trainer.deepspeed.zero_optimization.offload_optimizer.device=cpu", "trainer.optimizer=torch_adamw"],
         "DeepSpeed runs an offloaded optimizer step through its own CPU Adam"),
        (1, ["trainer=default", "trainer.teacher_zero3=true"], "trainer.teacher_zero3 partitions the teacher"),
    ],
)
def test_bad_distributed_settings_stop_with_one_line(tmp_path, capsys, monkeypatch, world, overrides, message):
    """Checked before any process group or model exists, so a bad launch ends at once on every rank."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if not any(o.startswith("trainer=") for o in overrides):
        overrides = ["trainer=zero2", *overrides]
    assert main(["train", *BASE, f"run_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "config.yaml").exists()


def _teacher_ranks(out: Path) -> None:
    """Each rank: the tiny teacher whole and partitioned by ZeRO-3, on this rank's own batch (the gathers are
    collective, the data need not be): block inputs and outputs, Q and K of the stage-1/2 capture (hooks on the
    partitioned model), the final hidden states, the logits and the LM head stage 3 reads."""
    from omegaconf import OmegaConf

    from distill import distributed
    from distill.config import TeacherConfig, config_dir
    from distill.models.teachers import load_teacher

    yaml = OmegaConf.load(config_dir() / "teacher" / "tiny-llama.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TeacherConfig), yaml))
    device = torch.device("cpu")
    rank, _ = distributed.init(device)
    whole = load_teacher(cfg)
    zero = distributed.partition_teacher(
        load_teacher(cfg), {"zero_optimization": {"stage3_param_persistence_threshold": 0}}, device
    )
    ids = torch.randint(0, 257, (2, 96), generator=torch.Generator().manual_seed(rank))
    layers = [0, 2, 3]
    a, b = whole.capture(ids, layers).layers, zero.capture(ids, layers).layers
    pairs = [(getattr(a[i], f), getattr(b[i], f)) for i in layers for f in ("block_input", "block_output", "q", "k")]
    pairs += [(whole.final_hidden(ids), zero.final_hidden(ids)), (whole.logits(ids), zero.logits(ids))]
    pairs += [(whole.lm_head.weight, zero.lm_head.weight)]
    result = {
        "max_difference": max((x.float() - y.float()).abs().max().item() for x, y in pairs),
        "partitioned": all(p.numel() == 0 for p in zero.model.parameters()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__" and sys.argv[1] == "teacher":
    _teacher_ranks(Path(sys.argv[2]))
