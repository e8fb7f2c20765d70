"""A `jax.profiler` trace of chosen training steps, written for TensorBoard's profile tab.

`train.profile_steps = (start, stop)` traces the updates that take the step counter from
`start` to `stop` (the metrics rows start + 1 .. stop), each inside a
`jax.profiler.StepTraceAnnotation("train", step_num=...)` so the profile tab's step-time view
separates them. The trace covers everything the loop does in those steps: reading and
decoding the batch, the host-to-device transfer, the compiled step, metrics and checkpoints.
It is written to `<logdir>/plugins/profile/<run>/<host>.xplane.pb`, where TensorBoard (with
the `tensorboard-plugin-profile` package) finds it. `()` (the default) turns it off: then
`step` returns a shared `contextlib.nullcontext()` and no profiler is started.
"""
from __future__ import annotations

import contextlib
import logging

import jax

log = logging.getLogger(__name__)
_NO_PROFILE = contextlib.nullcontext()


def profile_window_problem(profile_steps) -> str | None:
    """A sentence if `profile_steps` is neither () nor (start, stop) with 0 <= start < stop."""
    window = tuple(profile_steps)
    if not window:
        return None
    if len(window) != 2 or not all(isinstance(v, int) for v in window) or not 0 <= window[0] < window[1]:
        return f"train.profile_steps must be () or (start, stop) with 0 <= start < stop, got {window}"
    return None


class StepProfiler:
    """Starts a trace before update `start`, stops it after update `stop` - 1 (module docstring)."""

    def __init__(self, profile_steps, logdir: str):
        window = tuple(profile_steps)
        self.start, self.stop = window if window else (0, 0)
        self.logdir = str(logdir)
        self.active = False
        self._done = not window

    def step(self, step: int, state_after=lambda: None):
        """Context around the loop's work for update `step` (0-based: the counter before it).

        `state_after` returns what the step produced; it is waited for before a trace stops,
        so the trace holds the device's work of the last traced step. Outside the window (and
        always when profiling is off) this is a shared `contextlib.nullcontext()`.
        """
        if self._done or step >= self.stop:  # off, or already past the window (a resumed run)
            self._done = True
            return _NO_PROFILE
        if not self.active and step < self.start:
            return _NO_PROFILE
        return self._traced(step, state_after)

    @contextlib.contextmanager
    def _traced(self, step: int, state_after):
        if not self.active:
            log.info("profiling steps %d..%d into %s", step + 1, self.stop, self.logdir)
            jax.profiler.start_trace(self.logdir)
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if step + 1 >= self.stop:
            jax.block_until_ready(state_after())
            self.close()

    def close(self) -> None:
        """Stops a running trace (also when the loop ends or fails inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self._done = True
            log.info("profile written under %s", self.logdir)
