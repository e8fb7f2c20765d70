"""A `jax.profiler` trace of chosen training steps, written for TensorBoard's profile tab.

`train.profile_steps = (start, stop)` traces the updates that take the step counter from
`start` to `stop` (the metrics rows start + 1 .. stop), each inside a
`jax.profiler.StepTraceAnnotation("train", step_num=...)` so the profile tab's step-time view
separates them. The trace covers everything the loop does in those steps: reading and
decoding the batch, the host-to-device transfer, the compiled step, metrics and checkpoints.
It is written to `<logdir>/plugins/profile/<run>/<host>.xplane.pb` (local or gs://), where
TensorBoard (with the `tensorboard-plugin-profile` package) finds it. `()` (the default) turns it off: then
`step` returns a shared `contextlib.nullcontext()` and no profiler is started.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import tempfile

import jax

from primus_jax import paths

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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class StepProfiler:
    """Starts a trace before update `start`, stops it after update `stop` - 1 (module docstring).

    The profiler writes to a local temporary folder, whose files are then copied under `logdir`
    through `primus_jax.paths`, so a gs:// workdir gets its profile like a local one. A profiler
    that cannot start or write is reported in one warning; training goes on without it.
    """

    def __init__(self, profile_steps, logdir):
        window = tuple(profile_steps)
        self.start, self.stop = window if window else (0, 0)
        self.logdir = str(logdir)
        self.active = False
        self._done = not window
        self._local: str | None = None

    def step(self, step: int, state_after=lambda: None):
        """Context around the loop's work for update `step` (0-based: the counter before it).

        `state_after` returns what the step produced; it is waited for before a trace stops,
        so the trace holds the device's work of the last traced step. Outside the window (and
        always when profiling is off) this is a shared `contextlib.nullcontext()`.
        """
        if self.active:
            return self._traced(step, state_after)
        if self._done or step >= self.stop:  # off, done, or already past the window (a resumed run)
            self._done = True
            return _NO_PROFILE
        if step < self.start:
            return _NO_PROFILE
        return self._traced(step, state_after)

    @contextlib.contextmanager
    def _traced(self, step: int, state_after):
        if not self.active:
            self._start(step)
        if not self.active:  # the profiler could not start
            yield
            return
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if step + 1 >= self.stop:
            jax.block_until_ready(state_after())
            self.close()

    def _start(self, step: int) -> None:
        log.info("profiling steps %d..%d into %s", step + 1, self.stop, self.logdir)
        self._done = True  # one window per run, whether or not it starts
        self._local = tempfile.mkdtemp(prefix="primus_profile_")
        try:
            jax.profiler.start_trace(self._local)
        except Exception as error:  # noqa: BLE001 - a profile is never worth stopping the run
            log.warning("could not start the profiler (%s); training goes on without a profile", _first_line(error))
            shutil.rmtree(self._local, ignore_errors=True)
            return
        self.active = True

    def close(self) -> None:
        """Stops a running trace (also when the loop ends or fails inside the window) and copies it
        to `logdir`."""
        if not self.active:
            return
        self.active = False
        local = pathlib.Path(self._local)
        try:
            jax.profiler.stop_trace()
            destination = paths.resolve(self.logdir)
            for source in sorted(local.rglob("*")):
                if source.is_file():
                    target = destination / str(source.relative_to(local))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(source.read_bytes())
        except Exception as error:  # noqa: BLE001 - as in _start
            log.warning("could not write the profile to %s (%s); training goes on", self.logdir, _first_line(error))
        else:
            log.info("profile written under %s", self.logdir)
        finally:
            shutil.rmtree(local, ignore_errors=True)
