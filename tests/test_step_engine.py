"""Step engines (distill.step_engine): which backend a run gets, and the optimizer and schedule state a checkpoint
keeps of an eager engine resuming a fresh one exactly. The captured engine runs on CUDA only (test_gpu.py trains
with it); the DeepSpeed one under torchrun (test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from distill import step_engine
from distill.checkpoint import RunState, load_checkpoint
from distill.config import StageConfig, StudentConfig
from distill.graph_step import lambda_schedule
from distill.models.transfer import build_student
from distill.stages import trainable_parameters
from distill.trainer import lr_factor

STAGE = StageConfig(loss="matrix", tokens=2 * 48 * 8, batch_size=2, seq_len=48, lr=2e-2, trainable="mixers")
TOTAL = 8


@pytest.mark.parametrize(
    "overrides, device, kind",
    [
        ([], "cpu", "EagerStepEngine"),
        (["trainer.cuda_graphs=true"], "cpu", "EagerStepEngine"),  # no graphs on the CPU
        (["trainer.cuda_graphs=false"], "cuda", "EagerStepEngine"),
        (["trainer.cuda_graphs=true"], "cuda", "GraphStepEngine"),
        (["trainer=zero2"], "cpu", "DeepSpeedStepEngine"),
        (["trainer=zero3", "trainer.cuda_graphs=true"], "cuda", "DeepSpeedStepEngine"),  # DeepSpeed takes the step
    ],
)
def test_the_factory_chooses_the_engine(tiny_cfg, overrides, device, kind):
    cfg = tiny_cfg(*overrides)
    assert step_engine.engine_kind(cfg.trainer, torch.device(device)).__name__ == kind


def _setup(teacher, student, check=lambda result: None, name="stage1"):
    params = list(trainable_parameters(student, STAGE.trainable).values())
    student.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return step_engine.StepSetup(
        name, STAGE, student, teacher, params, schedule=lambda s: lr_factor(s, TOTAL, STAGE), precision="fp32",
        device=torch.device("cpu"), check=check,
    )


def _batches(n):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return [torch.randint(0, 257, (STAGE.batch_size, STAGE.seq_len), generator=g) for _ in range(n)]


def test_build_on_the_cpu_gives_the_eager_engine(tiny_llama, tiny_cfg):
    student = build_student(tiny_llama, StudentConfig(), attention_layers=[1])
    engine = step_engine.build(_setup(tiny_llama, student), tiny_cfg("trainer.cuda_graphs=true").trainer)
    assert type(engine) is step_engine.EagerStepEngine
    assert not engine.optimizer.param_groups[0].get("capturable")


def test_an_eager_engines_checkpoint_resumes_a_fresh_engine_exactly(tiny_llama, tmp_path):
    """3 steps, a checkpoint, then 3 more: a fresh student and engine restored from the checkpoint take the same
    3 steps (losses, gradient norms, learning rates, weights) as the engine that went on; without the optimizer and
    schedule state (the weights alone) the steps after the first differ."""
    base = build_student(tiny_llama, StudentConfig(), attention_layers=[1])
    engine = step_engine.EagerStepEngine(_setup(tiny_llama, base))
    before, after = _batches(3), _batches(3)
    for batch in before:
        engine.step(batch)
    engine.save(tmp_path, "mid", RunState(step=3), keep=2)
    folder = tmp_path / "checkpoints" / "mid"

    def resumed(restore: bool):
        student = build_student(tiny_llama, StudentConfig(), attention_layers=[1])
        _, payload = load_checkpoint(folder, student)
        fresh = step_engine.EagerStepEngine(_setup(tiny_llama, student))
        if restore:
            assert fresh.restore(payload["optimizer"], folder) is None
        return student, fresh

    def steps(eng):
        out = []
        for batch in after:
            result, norm = eng.step(batch)
            out.append((result.loss, float(norm), eng.lr))
        return out

    went_on = steps(engine)
    student, fresh = resumed(restore=True)
    assert steps(fresh) == went_on
    for (name, a), b in zip(base.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    _, weights_only = resumed(restore=False)
    bare = steps(weights_only)
    assert bare[0][:2] == went_on[0][:2]  # the first loss depends on the weights alone
    assert abs(bare[1][0] - went_on[1][0]) > 1e-6 * abs(went_on[1][0])  # then the moments and the schedule show
    assert bare[0][2] != went_on[0][2]


def test_a_deepspeed_checkpoint_resumes_an_eager_engine_with_fresh_moments(tiny_llama):
    """A DeepSpeed checkpoint's trainer.pt has no moments (they are DeepSpeed's partitioned files): the eager engine
    says why it starts them fresh, and goes on with the schedule's rate where it was."""
    engine = step_engine.EagerStepEngine(_setup(tiny_llama, build_student(tiny_llama, StudentConfig(), [1])))
    for batch in _batches(3):
        engine.step(batch)
    saved = {"optimizer": None, "scheduler": engine.scheduler.state_dict()}
    fresh = step_engine.EagerStepEngine(_setup(tiny_llama, build_student(tiny_llama, StudentConfig(), [1])))
    assert fresh.restore(saved, None) == "it was written by DeepSpeed"
    assert fresh.scheduler.last_epoch == 3 and fresh.lr == engine.lr
    assert fresh.optimizer.param_groups[0]["lr"] == engine.lr and not fresh.optimizer.state
    assert abs(engine.lr - STAGE.lr * lr_factor(3, TOTAL, STAGE)) < 1e-12 * STAGE.lr


def test_fresh_moments_keep_a_tensor_learning_rate():
    """A captured step's optimizer reads its rate from a tensor the graph holds: fresh moments fill that tensor with
    the schedule's rate rather than replacing it by a number (which the capture would refuse)."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g))]
    eager = torch.optim.AdamW(params, lr=0.05)
    schedule = lambda_schedule(eager, lambda s: 1.0 / (1 + s))
    for _ in range(4):
        params[0].grad = torch.randn(5, 3, generator=g)
        eager.step()
        schedule.step()
    lr = torch.tensor(0.05)
    fused = torch.optim.AdamW(params, lr=lr, fused=True)  # as the captured step's, but for capturable (CUDA only)
    saved = {"optimizer": None, "scheduler": schedule.state_dict()}
    step_engine.fresh_moments(fused, lambda_schedule(fused, lambda s: 1.0 / (1 + s)), saved)
    assert fused.param_groups[0]["lr"] is lr and abs(lr.item() - 0.05 / 5) < 1e-9


def test_an_eager_step_checks_the_loss_before_it_changes_a_weight(tiny_llama):
    class NonFinite(Exception):
        pass

    def check(result):
        raise NonFinite(result.loss)

    student = build_student(tiny_llama, StudentConfig(), attention_layers=[1])
    engine = step_engine.EagerStepEngine(_setup(tiny_llama, student, check))
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(NonFinite):
        engine.step(_batches(1)[0])
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())
    assert engine.scheduler.last_epoch == 0 and not engine.optimizer.state
