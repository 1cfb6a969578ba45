"""A graceful stop: SIGTERM or SIGINT asks `distill train` to stop after the step it is in, save a checkpoint there
and exit, so that a run preempted by a scheduler (SLURM and Kubernetes send SIGTERM first), cut by `timeout` or
stopped with Ctrl-C loses no finished step. A second signal stops at once, as the default would.

Under DeepSpeed every rank must stop at the same step (the checkpoint is written by all of them): the ranks agree
through one all-reduce of a flag per step, which is cheap beside the step's own all-reduces.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import torch


class Stopped(Exception):
    """The run stopped on a signal after saving its checkpoint; the same command resumes it."""

    def __init__(self, signum: int, where: str, checkpoint: str | None):
        self.signum = signum
        name = signal.Signals(signum).name
        then = (f"its latest checkpoint is {checkpoint}: run the same command to resume" if checkpoint
                else "no checkpoint yet: the same command starts it afresh")
        super().__init__(f"stopped by {name} {where}; {then}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


class StopRequest:
    """Set by SIGTERM or SIGINT while `handle_signals` is active; `pending` says whether to stop now."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one acts at once
        print(f"distill: got {signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def handle_signals(self):
        """Catch SIGTERM and SIGINT for the duration (only from the main thread, where Python delivers them)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def pending(self, device: torch.device | None = None) -> bool:
        """Whether to stop now; with several processes, whether any of them got a signal (all must agree)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
            if signum and self.signum is None:
                self.signum = signum
        return self.signum is not None
