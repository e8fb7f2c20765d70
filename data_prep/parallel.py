"""Runs a data_prep source over its recordings in parallel: one pure function per recording, two drivers.

A source describes its work as a job (`data_prep.narrated.NarratedJob`, `data_prep.har.HarJob`):

    job.catalog()               -> (items, input description): the recordings, in a fixed order
    job.setup()                 -> context: what a worker loads once (the frozen towers)
    job.header(context)         -> the DatasetWriter arguments (T, rate_hz, dims, towers, extra, ...)
    job.process(item, context)  -> (split, windows, report): the pure per-recording function
    job.failed(item, error)     -> report: the drops of a recording whose processing raised
    job.new_report()            -> the report that the per-recording reports are merged into

Recording i goes through `process_recording`: its windows are written to a staged dataset
`<out>/.staging/<i:08d>-<random>/` by a DatasetWriter (which checks every window and publishes
the staged manifest only once its shards are complete; the random part keeps two attempts at the
same recording, a runner's retry, apart). It returns a small `RecordingResult` (index, staged
folder, record count, report, header). `merge`, run once at the end, sorts the results by index,
sums the reports in that order, copies the staged records into the final DatasetWriter in
recording order, writes report.json and deletes the staging folder. The dataset therefore does
not depend on the driver or on the number of workers: the same records in the same splits, in
the same order, cut into the same shards.

Drivers (`prepare`):
  local (default)   --workers 1 runs in this process; --workers N starts N spawned processes that
                    each call job.setup() once and then take recordings one at a time. A worker
                    that dies stops the whole run with one sentence; nothing is published.
  Apache Beam       --runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner; every other
                    option goes to Beam's PipelineOptions (`data_prep.beam_pipeline`). The runner
                    retries failed bundles; the merge runs as the pipeline's last step.

A recording whose processing raises (an unreadable video or VRS, a bad CSV, anything
`job.process` does not turn into counted drops itself) is dropped and counted by `job.failed`,
in whichever worker it happens; it never stops the run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import uuid
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

import cloudpickle
import tqdm

from data_prep import common
from primus_jax import paths
from primus_jax.data import MANIFEST_NAME, DatasetWriter, TFRecordIndex, read_manifest

STAGING_DIR = ".staging"
RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")


class WorkerDied(RuntimeError):
    """A local worker process ended abruptly (killed, out of memory, crashed)."""


@dataclasses.dataclass(frozen=True)
class Driver:
    """How to run a job: `workers` local processes, or a Beam `runner` with its `beam_args`."""

    workers: int = 1
    runner: str | None = None
    beam_args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RecordingResult:
    """What one recording's processing hands to the merge step (small: no window data)."""

    index: int
    staged: str | None  # the staged dataset folder, None when no window was kept
    records: int
    report: common.Report
    header: dict


def process_recording(job, context, index: int, item, staging: str) -> RecordingResult:
    """Processes recording `index` and stages its windows; see the module docstring.

    An exception from `job.process` drops the recording (`job.failed`); an exception while
    staging (the output store failing) propagates, so the driver stops or its runner retries.
    """
    header = job.header(context)
    try:
        split, windows, report = job.process(item, context)
    except Exception as error:  # noqa: BLE001  (any failure of one recording drops that recording)
        return RecordingResult(index, None, 0, job.failed(item, error), header)
    if not windows:
        return RecordingResult(index, None, 0, report, header)
    staged = f"{staging}/{index:08d}-{uuid.uuid4().hex[:12]}"
    with DatasetWriter(staged, **header, overwrite=True) as writer:
        for window in windows:
            writer.add(split, window)
    return RecordingResult(index, staged, len(windows), report, header)


def merge(job, results: Sequence[RecordingResult], out_dir, staging, overwrite: bool) -> common.Report:
    """The single final step: sums the reports, publishes the dataset and report.json.

    Results are taken in recording order. When no window was kept only report.json is written
    (a previous dataset in out_dir stays as it was). The staging folder is deleted at the end.
    """
    results = sorted(results, key=lambda result: result.index)
    report = job.new_report()
    for result in results:
        report.merge(result.report)
    staged = [result for result in results if result.staged]
    headers = {json.dumps(result.header, sort_keys=True) for result in staged}
    if len(headers) > 1:
        raise ValueError(f"{out_dir}: the workers disagree on the dataset header (towers or settings): {sorted(headers)}")
    if not staged:
        report.write(out_dir)
    else:
        with DatasetWriter(out_dir, **staged[0].header, overwrite=overwrite) as writer:
            for result in staged:
                _copy_records(result.staged, writer)
            report.write(out_dir)
    _remove(staging)
    return report


def _copy_records(staged_dir: str, writer: DatasetWriter) -> None:
    folder = paths.resolve(staged_dir)
    for split, info in read_manifest(folder)["splits"].items():
        for entry in info["shards"]:
            with TFRecordIndex(folder / entry["file"]) as records:
                for i in range(len(records)):
                    writer.add_encoded(split, records.read(i))


def _remove(folder) -> None:
    folder = paths.resolve(folder)
    if folder.exists():
        folder.rmtree()


def staging_dir(out_dir) -> str:
    return str(paths.resolve(out_dir) / STAGING_DIR)


def prepare(job, out_dir, *, driver: Driver = Driver(), overwrite: bool = False) -> common.Report:
    """Runs `job` with `driver` into out_dir (local or gs://); returns the merged Report.

    Raises:
      FileExistsError: out_dir holds a dataset and overwrite is False (checked before any work).
      common.NothingUsable: no window was kept (report.json is written, no dataset).
      WorkerDied: a local worker process died; nothing was published.
    """
    manifest = paths.resolve(out_dir) / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest}: a dataset already exists here; pass --overwrite to replace it")
    if driver.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {driver.workers}.")
    items, description = job.catalog()
    staging = staging_dir(out_dir)
    _remove(staging)  # what a crashed run left behind
    if driver.runner:
        from data_prep import beam_pipeline

        beam_pipeline.run(job, len(items), str(out_dir), staging, overwrite, driver)
        content = json.loads((paths.resolve(out_dir) / "report.json").read_text())
        report = type(job.new_report()).from_dict(content)
    else:
        results = run_local(job, items, staging, driver.workers)
        report = merge(job, results, out_dir, staging, overwrite)
    report.require_some(description)
    return report


def run_local(job, items: Sequence, staging: str, workers: int) -> list[RecordingResult]:
    """Processes every item in this process (workers == 1) or in `workers` spawned processes."""
    progress = tqdm.tqdm(total=len(items), desc=job.new_report().source, unit="recording")
    with progress:
        if workers == 1:
            context = job.setup()
            results = []
            for index, item in enumerate(items):
                results.append(process_recording(job, context, index, item, staging))
                progress.update()
            return results
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(cloudpickle.dumps(job),),
        )
        try:
            futures = [pool.submit(_run_in_worker, index, item, staging) for index, item in enumerate(items)]
            results = []
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                progress.update()
        except BrokenProcessPool:
            unfinished = sum(not future.done() or future.exception() is not None for future in futures)
            raise WorkerDied(
                f"a data_prep worker process died (killed, out of memory or crashed) with {unfinished} of "
                f"{len(items)} recordings unfinished; the run stopped and published nothing, rerun it to start over"
            ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results


_WORKER: dict = {}


def _start_worker(job_bytes: bytes) -> None:
    """Process-pool initializer: loads the job and its context (the towers) once per worker."""
    job = cloudpickle.loads(job_bytes)
    try:
        _WORKER.update(job=job, context=job.setup(), error=None)
    except Exception as error:  # noqa: BLE001  (reported by every task of this worker, see below)
        _WORKER.update(job=job, context=None, error=f"{type(error).__name__}: {error}")


def _run_in_worker(index: int, item, staging: str) -> RecordingResult:
    if _WORKER["error"] is not None:
        raise ValueError(f"a data_prep worker could not start: {_WORKER['error']}")
    return process_recording(_WORKER["job"], _WORKER["context"], index, item, staging)


def add_driver_arguments(parser) -> None:
    """--workers and --runner; with --runner, unknown options are Beam pipeline options."""
    parser.add_argument("--workers", type=int, default=1,
                        help="local driver: processes on this machine, each loading the towers once")
    parser.add_argument("--runner", choices=RUNNERS,
                        help="run on Apache Beam (pip install primus_jax[beam]); other options such as "
                        "--project, --region, --temp_location go to Beam's PipelineOptions")


def parse_args(parser, argv: Sequence[str] | None):
    """(args, Driver): parses argv; options the parser does not know are allowed only with --runner."""
    args, unknown = parser.parse_known_args(argv)
    if unknown and not args.runner:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (Beam pipeline options need --runner)")
    if args.runner and args.workers != 1:
        parser.error("--workers is for the local driver; with --runner use the runner's own option "
                     "(--direct_num_workers, --num_workers, ...)")
    return args, Driver(workers=args.workers, runner=args.runner, beam_args=tuple(unknown))
