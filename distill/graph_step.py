"""A stage's whole training step captured once as a CUDA graph and replayed for every batch.

A step of a small teacher and student is thousands of small kernels: teacher forward, student forward and backward
over ~30 layers, the loss, clipping and AdamW. Where launching them one by one sets the pace (small batches, a slow
host), one graph launch that reads the batch from a static buffer and leaves its losses and gradient norm in static
outputs removes that cost. `trainer.cuda_graphs=true` turns it on (the GPU presets do). Measured on an H200 with
SmolLM2-135M's shapes at batch 16 x 2048 (bench/RESULTS.md): on 2026-12-01, before the fused conv, norm, gate and
divergence kernels, the steps were bound by the GPU and replay was 1-5% slower; on 2026-12-03, with them, the eager
steps wait on the host's launches and replayed stages 1 / 2 / 3 ran 1.29x / 1.35x / 1.10x faster.

What a captured step needs, and how it gets it:
- no host synchronisation inside the step: the step functions return tensors, read once after the replay
  (StepResult.to_floats);
- an optimizer that updates in place, its learning rate a device tensor: torch's fused AdamW with capturable=True;
  `set_lr` writes each step's scheduled rate into that tensor before the replay;
- a non-finite loss must leave the weights as they were (the eager trainer checks before its optimizer step): the
  graph sets the optimizer's `found_inf` flag from the loss and the gradient norm, and fused AdamW then skips its
  update, as it does under a GradScaler; the trainer reads the loss and stops;
- warm-up steps (they compile the Triton kernels and settle the allocator) must not change the run: the weights
  and the optimizer state are put back before the capture, so a run computes what the eager one does.
Capture fails where some code inside the step synchronises with the host; `capture_step` then returns None with
the reason, and the stage's engine (step_engine.GraphStepEngine) runs it eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The optimizer flags that depend on how a step runs, not on what it computes.
RUN_FLAGS = ("capturable", "fused", "foreach", "differentiable")


def make_adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device, graphs: bool):
    """The stages' AdamW: fused and capturable, with a tensor learning rate, for a captured step; torch's default
    kernels otherwise (foreach on CUDA)."""
    kwargs = dict(betas=(0.9, 0.95), weight_decay=weight_decay)
    if graphs:
        lr_tensor = torch.tensor(float(lr), dtype=torch.float32, device=device)
        return torch.optim.AdamW(params, lr=lr_tensor, fused=True, capturable=True, **kwargs)
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load `saved` (any run's optimizer state) into `optimizer` keeping the optimizer's own run flags and kind of
    learning rate. torch's load_state_dict takes every hyper-parameter from the saved groups, so a checkpoint of a
    captured run would make an eager run's optimizer fused and capturable, and the reverse; this keeps checkpoints
    interchangeable between the two."""
    own = [{k: g[k] for k in (*RUN_FLAGS, "lr") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, flags in zip(optimizer.param_groups, own):
        saved_lr = float(group["lr"])
        if torch.is_tensor(group.get("initial_lr")):
            group["initial_lr"] = float(group["initial_lr"])
        group.update({k: v for k, v in flags.items() if k != "lr"})
        if torch.is_tensor(flags["lr"]):
            flags["lr"].fill_(saved_lr)
            group["lr"] = flags["lr"]
        else:
            group["lr"] = saved_lr
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:  # fused / capturable keep the step count on the parameter's device
                step = state["step"]
                state["step"] = step.to(torch.float32).to(p.device if on_device else "cpu")


def lambda_schedule(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]):
    """LambdaLR over `optimizer` with its base rates kept as numbers: from a tensor rate, LambdaLR would make every
    scheduled rate (and the saved schedule) a tensor, which an eager AdamW resuming from it refuses."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    _rates_as_numbers(scheduler)
    return scheduler


def load_schedule_state(scheduler, saved: dict) -> None:
    scheduler.load_state_dict(saved)
    _rates_as_numbers(scheduler)


def _rates_as_numbers(scheduler) -> None:
    scheduler.base_lrs = [float(b) for b in scheduler.base_lrs]
    scheduler._last_lr = [float(x) for x in scheduler._last_lr]
    for group in scheduler.optimizer.param_groups:
        if torch.is_tensor(group.get("initial_lr")):
            group["initial_lr"] = float(group["initial_lr"])


def set_lr(optimizer: torch.optim.Optimizer, lr_tensors: list[torch.Tensor]) -> None:
    """Write each group's scheduled rate into its device tensor (what the graph reads), wherever the scheduler put
    it: torch's schedulers fill a tensor rate in place in recent versions and replace it by a number in older ones."""
    for group, tensor in zip(optimizer.param_groups, lr_tensors):
        if group["lr"] is not tensor:
            tensor.fill_(float(group["lr"]))
            group["lr"] = tensor


class CapturedStep:
    """One stage's training step (step_fn's forward, loss and backward; clipping; the optimizer step) as a CUDA
    graph over a static batch of `example`'s shape. Call it with each batch; it returns (StepResult of tensors,
    gradient norm), valid until the next call."""

    def __init__(
        self,
        step_fn: Callable,
        student: torch.nn.Module,
        teacher,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        grad_clip: float,
        precision: str,
        example: torch.Tensor,
    ):
        self.step_fn, self.student, self.teacher = step_fn, student, teacher
        self.params, self.optimizer, self.grad_clip, self.precision = params, optimizer, grad_clip, precision
        self.ids = example.clone()
        self.lr_tensors = [g["lr"] for g in optimizer.param_groups]
        if not all(torch.is_tensor(t) and t.is_cuda for t in self.lr_tensors):
            raise ValueError("a captured step needs make_adamw(..., graphs=True): fused, capturable, tensor lr")
        self.found_inf = torch.zeros((), dtype=torch.float32, device=example.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None

    def _step(self):
        result = self.step_fn(self.student, self.teacher, self.ids, self.precision)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        bad = torch.logical_not(torch.isfinite(result.loss) & torch.isfinite(grad_norm))
        self.found_inf.copy_(bad.to(torch.float32))
        self.optimizer.step()
        return result, grad_norm

    def capture(self, warmup: int = 2) -> None:
        """Warm up on a side stream, put weights and optimizer state back, capture."""
        opt = self.optimizer
        opt.found_inf = self.found_inf  # read by fused AdamW: a non-finite step leaves the weights alone
        weights = [p.detach().clone() for p in self.params]
        before = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w)
            for p, state in opt.state.items():  # in place: the graph keeps these tensors' addresses
                for key, value in state.items():
                    if torch.is_tensor(value):
                        value.copy_(before[p][key]) if p in before else value.zero_()  # zeros: a fresh AdamW
        del weights, before
        opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph's pool
        torch.cuda.empty_cache()  # the warm-up's cached blocks would otherwise sit beside the graph's private pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._step()

    def __call__(self, batch: torch.Tensor):
        set_lr(self.optimizer, self.lr_tensors)
        self.ids.copy_(batch)
        self.graph.replay()
        return self.outputs

    def close(self) -> None:
        """Drop the graph and its memory pool; the optimizer steps eagerly again."""
        self.graph = self.outputs = None
        if getattr(self.optimizer, "found_inf", None) is self.found_inf:
            del self.optimizer.found_inf
        torch.cuda.empty_cache()


def capture_step(step_fn, student, teacher, params, optimizer, grad_clip, precision, example):
    """A CapturedStep, or (None, why) where this step cannot be captured (something in it synchronises)."""
    captured = CapturedStep(step_fn, student, teacher, params, optimizer, grad_clip, precision, example)
    try:
        captured.capture()
    except RuntimeError as error:  # e.g. "operation not permitted when stream is capturing"
        captured.close()
        torch.cuda.synchronize()
        return None, str(error).splitlines()[0]
    return captured, None
