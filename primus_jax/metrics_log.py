"""What the pretraining loop writes and listens to besides the step: the metrics log
(metrics.jsonl and TensorBoard) and the preemption signal.
"""
from __future__ import annotations

import json
import logging
import signal
import time

import jax

from primus_jax import paths

log = logging.getLogger(__name__)


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars in the workdir, local or gs:// (process 0 only).

    A GCS object cannot be appended to, so metrics.jsonl is held in memory (the lines an earlier
    run of this workdir wrote, then each new one) and rewritten whole with `paths.atomic_write`:
    the file always holds complete lines, locally and on GCS alike. It is rewritten at most every
    `flush_every_s` seconds, at every checkpoint (so no line a resumed run will not replay is
    lost to a kill) and on close, so a long run does not upload it at every log step.
    TensorBoard events go through tensorboardX, which writes gs:// itself.
    """

    def __init__(self, workdir, flush_every_s: float = 10.0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = paths.resolve(workdir)
        self._path = workdir / "metrics.jsonl"
        self._text = self._path.read_text() if self._path.exists() else ""
        self._flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._text += json.dumps(record) + "\n"
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def flush(self) -> None:
        """Rewrite metrics.jsonl with every line so far."""
        if self.enabled:
            paths.atomic_write(self._path, self._text)
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._tb.close()


class StopSignal:
    """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)
