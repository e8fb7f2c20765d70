"""The Apache Beam driver of `data_prep.parallel` (needs the [beam] extra: apache-beam).

    Create(0 .. n-1) | Reshuffle | ParDo(RecordingDoFn) | ToList | Map(merge)

Elements are recording indices only: each worker rebuilds the recording list once in
`DoFn.setup` with `job.catalog()` (it reads the annotation files; the list is never shipped in
the job graph, which stays small at any corpus size) and loads the towers there with
`job.setup()`. `process` runs `parallel.process_recording`, which stages the recording's windows
under `<out>/.staging/`; a retried bundle stages into a fresh folder, and only the result the
runner commits reaches the merge. The merge, the pipeline's last step, runs once on one worker
and writes the shards, manifest.json and report.json exactly as the local driver does.
"""
from __future__ import annotations

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ValueError("--runner needs Apache Beam: pip install 'primus_jax[beam]'.") from None

from data_prep import parallel


class RecordingDoFn(beam.DoFn):
    """index -> RecordingResult; the recording list and the towers are loaded once per worker."""

    def __init__(self, job, staging: str):
        self.job = job
        self.staging = staging

    def setup(self):
        self.items, _ = self.job.catalog()
        self.context = self.job.setup()

    def process(self, index: int):
        yield parallel.process_recording(self.job, self.context, index, self.items[index], self.staging)


def _merge(results, job, out_dir: str, staging: str, overwrite: bool) -> int:
    return parallel.merge(job, results, out_dir, staging, overwrite).total_kept


def run(job, n_items: int, out_dir: str, staging: str, overwrite: bool, driver: parallel.Driver) -> None:
    """Runs the pipeline with `driver.runner` and `driver.beam_args` and waits for it to finish."""
    options = PipelineOptions([f"--runner={driver.runner}", *driver.beam_args])
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "Recordings" >> beam.Create(range(n_items))
            | "Spread" >> beam.Reshuffle()
            | "Process" >> beam.ParDo(RecordingDoFn(job, staging))
            | "Collect" >> beam.combiners.ToList()
            | "Merge" >> beam.Map(_merge, job, out_dir, staging, overwrite)
        )
