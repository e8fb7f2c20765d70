"""Entry point: `python -m primus_jax.main --config configs/X.py --workdir DIR [--config.a.b=v ...]`.

`config.mode` picks the job: "pretrain" (default.py and ablations.py: pretrain on a prepared
dataset, checkpoint, export) or "demo" (demo.py: prepare the bundled real data, pretrain PRIMUS and
the baselines, evaluate, report). Configuration errors exit with one sentence and status 2; bad
input (a dataset, a path with an unsupported scheme, a missing bucket) with one sentence and 1.

`--workdir` and `--config.data.dir` may be local or gs://bucket/path (see primus_jax.paths); the
demo writes its data, report and plots to local disk only.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags



def define_flags() -> None:
    """The command's flags, defined only when it runs as a command (see `cli.run_command`)."""
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/X.py)")
    flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, reports and the export")
    flags.mark_flags_as_required(["config", "workdir"])


CLUSTER_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_requested(dist) -> bool:
    if dist.initialize == "never":
        return False
    if dist.initialize == "always" or dist.coordinator_address:
        return True
    if any(os.environ.get(v) for v in CLUSTER_ENV_VARS):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed(dist) -> None:
    """Call jax.distributed.initialize when the config or the environment describes a cluster.

    On CPU the cross-process collectives use gloo. A process that loses its peers fails after
    `heartbeat_timeout_s` instead of hanging.
    """
    import jax

    if not _cluster_requested(dist):
        return
    if (os.environ.get("JAX_PLATFORMS") or "cpu").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=dist.coordinator_address or None,
        num_processes=dist.num_processes or None,
        process_id=dist.process_id if dist.process_id >= 0 else None,
        heartbeat_timeout_seconds=dist.heartbeat_timeout_s,
    )


def run(config, workdir: str) -> dict:
    """Run the job `config.mode` names; returns its summary."""
    mode = config.get("mode", "pretrain")
    if mode == "pretrain":
        from primus_jax import evaluators, train

        # Built (and checked) before anything is read or compiled: an unknown evaluator fails here.
        summary = train.train_and_evaluate(config, workdir, evaluators=evaluators.Evaluators(config))
        summary.pop("state")
        return summary
    if mode == "demo":
        from primus_jax import demo, paths

        workdir = paths.require_local(workdir, "the demo's workdir (data, report, plots)")
        if config.demo.data_root:
            config.demo.data_root = paths.require_local(config.demo.data_root, "demo.data_root")
        return demo.run_demo(config, workdir)
    raise ValueError(f"config.mode must be 'pretrain' or 'demo', got {mode!r}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and XLA are chatty at INFO
    logging.getLogger("primus_jax").setLevel(logging.INFO)
    config = flags.FLAGS.config
    from primus_jax import checkpoint, data, paths, train, trainconfig

    try:
        initialize_distributed(config.distributed)
        summary = run(config, flags.FLAGS.workdir)
    except (trainconfig.ConfigError, data.DataError, checkpoint.CheckpointError, train.TrainingError,
            paths.PathError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, trainconfig.ConfigError) else 1)
    if summary.get("preempted"):
        print(f"preempted at step {summary['step']}: checkpoint saved in {flags.FLAGS.workdir}", file=sys.stderr)
    elif "skipped_updates" in summary:
        print(f"finished at step {summary['step']}: {summary['skipped_updates']} non-finite updates skipped, "
              f"{summary['skipped_records']} corrupt records skipped", file=sys.stderr)


if __name__ == "__main__":
    from primus_jax.cli import run_command

    run_command(main, define_flags)
