"""Stopping at a step boundary when the cluster asks (preemption, a time limit).

A signal handler may run between any two bytecodes, in the middle of a collective or a
checkpoint write; all it does here is remember the signal. The training loop asks `StopRequest`
once per step and all ranks agree with one tiny all-reduce (`Trainer`), so every rank stops
after the same step, saves a checkpoint at that step and leaves with `TrainingStopped`; the
requeued job resumes at the next step. No step is trained twice and none is logged twice.

SIGTERM is what Slurm sends a preempted job (and what `kill` sends a local one); SIGUSR2 is what
submitit asks Slurm to send before the time limit, and what `job._interrupt()` sends after
SIGTERM. Either stops the run; who requeues it is the launcher's business (`TrainingJob`).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

__all__ = ["STOP_SIGNALS", "StopRequest", "TrainingStopped", "stop_on_signals"]

#: The signals that ask a run to stop at the next step boundary.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """The signals received so far; set by a handler, read by the training loop."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def handle(self, signum: int, frame=None) -> None:
        # Only a list append: no logging, locks or I/O inside a signal handler.
        self.signals.append(int(signum))

    def request(self, signum: int) -> None:
        """Ask for a stop without a signal (tests, an embedding application)."""
        self.handle(signum)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.signals[0]).name if self.signals else None

    def received(self, signum: int) -> bool:
        return int(signum) in self.signals


class TrainingStopped(Exception):
    """Training stopped at a step boundary on request; a checkpoint of that step is saved."""

    def __init__(self, signal_name: str, global_step: int, checkpoint: Optional[str]):
        self.signal_name = signal_name
        self.global_step = global_step
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal_name} after global step {global_step}; checkpoint "
                         f"{checkpoint or '(none written)'}; rerun the same command (or let the "
                         f"job requeue) to resume at step {global_step + 1}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + int(signal.Signals[self.signal_name])


@contextlib.contextmanager
def stop_on_signals(request: StopRequest, signals=STOP_SIGNALS) -> Iterator[dict[int, object]]:
    """Route `signals` to `request` while the block runs; yields the handlers they had before
    (submitit's requeue handler among them) and puts them back afterwards. Outside the main
    thread (where Python cannot install handlers) it changes nothing and yields {}."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    previous = {int(s): signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, request.handle)
    try:
        yield previous
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
