"""Preemption: a scheduler taking the machine back sends SIGTERM and waits a grace period.

- The train stage, on SIGTERM: asks each run still training to stop (`ray.cancel`, which Ray
  delivers to the worker as SIGINT), waits up to `compute.preempt_grace_s` for them, force-cancels
  what is left, and exits 143 (128 + SIGTERM), naming each run and the step its checkpoint holds.
  `make repro` then resumes every run from there.
- A run's worker, on SIGINT (the stage's request) or SIGTERM (sent to the worker itself): the
  training loop finishes the step it is in, writes that step's checkpoint and stops (`Preempted`).
  The checkpoint holds the running sums of the logging window it was in, so the resumed run
  logs, and ends with, what an uninterrupted run does. A cancel that lands while the worker waits
  on the driver's queue comes as Ray's TaskCancelledError out of that wait, not as the signal:
  the loop takes it as the same request (`StopRequest.request`).
- A data-parallel run (Ray Train, `compute.workers_per_run > 1`): its workers' loops run on
  threads of their own, where no signal handler runs (and Ray Train takes its task's SIGINT to
  abort the run). So the stage asks it through storage instead of `ray.cancel`: a stop marker in
  the run's folder in `compute.storage` (`ddp.request_stop`). Rank 0 looks for it at most every
  half second and broadcasts what it saw at each step, so every worker stops after the same
  step, reports that step's checkpoint to Ray Train and returns; `fit_run` raises `Preempted`
  with the step. The next run starts Ray Train again on the same name and storage, which
  resumes from that checkpoint. A SIGTERM to one Ray Train worker is a lost worker: Ray Train
  brings the group back from its last checkpoint (`compute.max_failures`).
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


class StopRequest:
    """Set by SIGINT or SIGTERM while the training loop runs (`signal`: which one came first)."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _set(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, name: str) -> None:
        """A stop asked for another way than by a signal handler (Ray's cancel inside a `ray.get`)."""
        self.signal = self.signal or name


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """A StopRequest the loop polls between steps; the previous handlers come back on exit. Off
    the main thread (Python handles signals there only) it is never set by a signal."""
    request, previous = StopRequest(), {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request._set)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stage:
    """The train stage's side. After SIGTERM, `stopping` holds when it came; the runs `watch`ed
    are asked to stop at once (and those watched later, as they start), and `poll` cancels what
    is still running once `grace_s` has passed. A run is asked by `ray.cancel`, or by `ask(ref)`
    where the stage gives one (a data-parallel run: `ddp.request_stop`)."""

    def __init__(self, grace_s: float):
        self.grace_s, self.stopping, self.forced, self.pending, self.ask = grace_s, None, False, {}, None

    def request(self) -> None:
        if self.stopping is None:
            self.stopping = time.monotonic()
            self._cancel(force=False)

    def watch(self, refs: dict, ask: Optional[Callable[[object], None]] = None) -> None:
        """The Ray refs of the runs now training (a dict the caller empties as they finish)."""
        self.pending, self.ask = refs, ask
        if self.stopping is not None:
            self._cancel(force=False)

    def poll(self) -> None:
        if self.stopping is not None and not self.forced and time.monotonic() - self.stopping > self.grace_s:
            self.forced = True
            self._cancel(force=True)

    def _cancel(self, force: bool) -> None:
        import ray

        for ref in list(self.pending):
            if self.ask is not None and not force:
                self.ask(ref)
            else:
                ray.cancel(ref, force=force)


@contextmanager
def on_sigterm(grace_s: float) -> Iterator[Stage]:
    """While the block runs, SIGTERM asks the watched runs to stop instead of ending the process."""
    stage = Stage(grace_s)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stage.request()) if main else None
    try:
        yield stage
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
