"""Captured training steps (distill.graph_step): the parts that run without a GPU.

A captured step needs an optimizer with other run flags (fused, capturable, a tensor learning rate) than an eager
one; checkpoints must move between the two. The capture itself is tested on CUDA in test_gpu.py.
"""

from __future__ import annotations

import torch

from distill.graph_step import lambda_schedule, load_optimizer_state, load_schedule_state, set_lr


def params_like(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def train(params, optimizer, scheduler, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        scheduler.step()
        if hasattr(optimizer, "_lr_tensors"):
            set_lr(optimizer, optimizer._lr_tensors)


def schedule(optimizer):
    return lambda_schedule(optimizer, lambda s: 1.0 / (1 + s))


def fused_with_tensor_lr(params, lr):
    """The captured step's optimizer kind (fused, tensor lr) as far as the CPU has it: no capturable on CPU."""
    optimizer = torch.optim.AdamW(params, lr=torch.tensor(lr), betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    optimizer._lr_tensors = [g["lr"] for g in optimizer.param_groups]
    return optimizer


def eager(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def test_checkpoints_move_between_eager_and_fused_optimizers():
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(5, 3, generator=g), torch.randn(7, generator=g)] for _ in range(6)]
    for first, second in ((eager, fused_with_tensor_lr), (fused_with_tensor_lr, eager)):
        # The whole run with one optimizer kind...
        whole = params_like(seed)
        opt = first(whole, 0.05)
        train(whole, opt, schedule(opt), grads)
        # ...against 3 steps with it, a checkpoint, and 3 steps with the other kind resumed from it.
        params = params_like(seed)
        opt = first(params, 0.05)
        sched = schedule(opt)
        train(params, opt, sched, grads[:3])
        saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
        resumed = second(params, 0.05)  # as the trainer resumes: optimizer, schedule, then their saved states
        own_lr = resumed.param_groups[0]["lr"]
        sched = schedule(resumed)
        load_optimizer_state(resumed, saved_opt)
        load_schedule_state(sched, saved_sched)
        # The resumed optimizer keeps its own flags and kind of learning rate, with the saved value.
        group = resumed.param_groups[0]
        assert bool(group["fused"]) == (second is fused_with_tensor_lr)
        assert (group["lr"] is own_lr) == torch.is_tensor(own_lr)
        assert abs(float(group["lr"]) - float(saved_opt["param_groups"][0]["lr"])) < 1e-9
        train(params, resumed, sched, grads[3:])
        for a, b in zip(params, whole):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (first.__name__, second.__name__)


def test_set_lr_writes_the_scheduled_rate_into_the_tensor_the_graph_reads():
    params = params_like(0)
    optimizer = fused_with_tensor_lr(params, 0.2)
    tensor = optimizer.param_groups[0]["lr"]
    optimizer.param_groups[0]["lr"] = 0.05  # as an older scheduler leaves it: a number in the tensor's place
    set_lr(optimizer, [tensor])
    assert optimizer.param_groups[0]["lr"] is tensor and abs(tensor.item() - 0.05) < 1e-9
