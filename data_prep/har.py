"""Labelled human-activity-recognition (HAR) IMU datasets -> primus_jax datasets.

    python -m data_prep.har --dataset watch --out DIR [--heldout-subjects 8,9,10]
    python -m data_prep.har --dataset basicmotions --out DIR
    python -m data_prep.har --dataset csv --csv-dir DIR --labels FILE --rate HZ --units {si,g} --out DIR
    ... [--workers N | --runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner BEAM_OPTIONS...]

Every recording is converted to SI units (m/s^2, rad/s), checked (`common.check_imu`),
resampled to --target-rate (default 50 Hz) and cut into windows of --T samples (default 250)
every --hop samples (default T/2); the tail shorter than a window is left out, and a recording
shorter than one window is dropped with the reason "shorter than window" in report.json.

Each window carries its class index and, as its weak narration, its activity: the text is the
first prompt of its class ("a person walking") and text_emb is the class prototype, the
L2-normalised mean of the embeddings of the class's five prompts ("a person walking",
"someone walking", ...). Every window of a class therefore has the same target: per-window
prompt variants would be arbitrary labels that the MM loss can only fit by memorising windows.
The text tower (default MiniLM, "none" for no embeddings) embeds the prompts once. The
manifest's "prompts" field holds {class name: [5 prompts]} for zero-shot evaluation. No video
(video_dim = 0).

Sources:
- watch: seglearn's smartwatch shoulder-physiotherapy data (Burns et al. 2018, SPAR): Apple
  Watch, 50 Hz, acc in g (converted with 9.80665 m/s^2 per g), gyro in rad/s, 140 recordings of
  20 repetitions, 10 subjects, 7 exercises. Split by subject: --heldout-subjects (default 8, 9,
  10) form split "heldout" (for downstream evaluation), the other 7 subjects split "train".
- basicmotions: UEA BasicMotions from aeon's bundled files (offline): smartwatch, 10 Hz, 10 s,
  channels acc x,y,z then gyro x,y,z. Its accelerometer has gravity removed (a standing
  recording averages ~0 m/s^2) and is kept as is, in m/s^2; gyro in rad/s. The given
  "train" and "test" recordings (40 + 40) stay in those splits. 4 classes.
- csv: a folder of CSV files with header columns ax,ay,az,gx,gy,gz (optional t, seconds) and a
  labels CSV with header file,label[,subject]. Splits by subject (or by file without
  subjects): --heldout-subjects, else `common.split_by_group` with --splits fractions. A
  missing, unreadable, wrongly-columned or non-finite file is dropped and counted.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from typing import Sequence

import numpy as np

from data_prep import common, parallel
from primus_jax import paths, towers
from primus_jax.data import Window

CSV_IMU_COLUMNS = ("ax", "ay", "az", "gx", "gy", "gz")
DEFAULT_HELDOUT_WATCH_SUBJECTS = ("8", "9", "10")
# Activity phrases are present participles ("walking", "doing shoulder abduction").
PROMPT_TEMPLATES = (
    "a person {}",
    "someone {}",
    "a person {} while wearing a smartwatch",
    "the camera wearer is {}",
    "a video of a person {}",
)
# seglearn watch labels PEN, ABD, FEL, IR, ER, TRAP, ROW (SPAR dataset description).
WATCH_ACTIVITIES = (
    ("pendulum", "doing pendulum shoulder swings"),
    ("abduction", "doing shoulder abduction"),
    ("forward elevation", "doing shoulder forward elevation"),
    ("internal rotation", "doing internal shoulder rotation with a resistance band"),
    ("external rotation", "doing external shoulder rotation with a resistance band"),
    ("lower trapezius row", "doing lower trapezius rows with a resistance band"),
    ("bent over row", "doing bent over rows with a dumbbell"),
)
BASICMOTIONS_ACTIVITIES = {
    "standing": "standing still",
    "walking": "walking",
    "running": "running",
    "badminton": "playing badminton",
}
# Gaps longer than this many nominal sample periods in a CSV's t column drop the file.
MAX_GAP_SAMPLES = 3


@dataclasses.dataclass
class Recording:
    """One labelled recording: imu (N, 6) float SI at rate_hz, optional timestamps_s (N,)."""

    recording_id: str
    imu: np.ndarray
    rate_hz: float
    label: int
    subject: str
    split: str
    timestamps_s: np.ndarray | None = None

    def load(self) -> "Recording":
        """A recording already in memory is its own item (see HarSource.items)."""
        return self


@dataclasses.dataclass(frozen=True)
class CsvFile:
    """A recording still on disk: one IMU CSV of `data_prep.har`'s csv source, read by `load()`."""

    recording_id: str
    path: str
    units: str
    rate_hz: float
    label: int
    subject: str
    split: str

    def load(self) -> Recording | common.Problem:
        result = read_imu_csv(self.path, self.units)
        if isinstance(result, common.Problem):
            return result
        imu, timestamps = result
        return Recording(self.recording_id, imu, self.rate_hz, self.label, self.subject, self.split, timestamps)


@dataclasses.dataclass
class HarSource:
    """A labelled dataset: class names, activity phrases for prompts, and its recordings.

    `items` are the recordings in order, each with `load() -> Recording | common.Problem` (a
    Recording in memory, or a CsvFile read when processed); `initial_drops` are the problems
    found while listing them (counted first in report.json).
    """

    name: str
    class_names: list[str]
    activities: list[str]
    items: list
    input_description: str
    expect_gravity: bool = True
    split_rule: str = ""
    initial_drops: tuple[common.Problem, ...] = ()


def class_prompts(activity: str) -> list[str]:
    """The five text prompts for an activity phrase such as "walking" or "doing squats"."""
    return [template.format(activity) for template in PROMPT_TEMPLATES]


def activity_phrase(label: str) -> str:
    """A CSV label as an activity phrase: "climbing_stairs" -> "climbing stairs", "sit" -> "doing sit"."""
    words = label.replace("_", " ").lower().split()
    return " ".join(words if words and words[0].endswith("ing") else ["doing"] + words)


def _subject_split(subject: str, heldout_subjects: Sequence[str]) -> str:
    return "heldout" if subject in heldout_subjects else "train"


def _check_heldout(heldout_subjects: Sequence[str], known: set[str], where: str) -> None:
    unknown = sorted(set(heldout_subjects) - known)
    if unknown:
        raise ValueError(f"--heldout-subjects: {unknown} not among the subjects of {where} ({sorted(known)}).")


def watch_source(heldout_subjects: Sequence[str] = DEFAULT_HELDOUT_WATCH_SUBJECTS) -> HarSource:
    """seglearn's smartwatch shoulder-exercise dataset, split by subject into train / heldout."""
    from seglearn.datasets import load_watch

    data = load_watch()
    labels = list(data["y_labels"])
    if len(labels) != len(WATCH_ACTIVITIES):
        raise ValueError(f"seglearn load_watch: expected 7 classes, got {labels}.")
    subjects = [str(int(s)) for s in data["subject"]]
    _check_heldout(heldout_subjects, set(subjects), "seglearn watch")

    recordings = []
    for index, (x, label, subject, side) in enumerate(zip(data["X"], data["y"], subjects, data["side"])):
        imu = np.array(x, dtype=np.float64)
        imu[:, :3] *= common.STANDARD_GRAVITY
        side_name = "right" if side == 1 else "left"
        recordings.append(Recording(
            f"watch-{index:03d}-s{subject}-{side_name}-{labels[int(label)]}",
            imu, 50.0, int(label), subject, _subject_split(subject, heldout_subjects),
        ))

    return HarSource(
        name="watch",
        class_names=[name for name, _ in WATCH_ACTIVITIES],
        activities=[phrase for _, phrase in WATCH_ACTIVITIES],
        items=recordings,
        input_description="seglearn watch dataset",
        split_rule=f"by subject: heldout = subjects {list(heldout_subjects)}, train = the rest",
    )


def basicmotions_source() -> HarSource:
    """UEA BasicMotions (aeon), its given train and test splits, 10 Hz, gravity-free accelerometer."""
    from aeon.datasets import load_basic_motions

    class_names = list(BASICMOTIONS_ACTIVITIES)

    recordings = []
    for split in ("train", "test"):
        x, y = load_basic_motions(split=split)
        for index, (series, label) in enumerate(zip(x, y)):
            recordings.append(Recording(
                f"basicmotions-{split}-{index:02d}", np.asarray(series, np.float64).T, 10.0,
                class_names.index(label), "", split,
            ))

    return HarSource(
        name="basicmotions",
        class_names=class_names,
        activities=list(BASICMOTIONS_ACTIVITIES.values()),
        items=recordings,
        input_description="aeon BasicMotions",
        expect_gravity=False,
        split_rule="the given train / test recordings",
    )


def _read_labels(labels_path: str) -> list[dict]:
    """Rows {file, label, subject} of a labels CSV with header file,label[,subject]."""
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f"Labels file {labels_path} does not exist.")
    with open(labels_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        if not {"file", "label"} <= set(header):
            raise ValueError(f"Labels file {labels_path}: header {header} lacks the columns 'file' and 'label'.")
        reader.fieldnames = header
        rows = [{key: (value or "").strip() for key, value in row.items() if key} for row in reader]
    if not rows:
        raise ValueError(f"Labels file {labels_path} has no rows.")
    return rows


def read_imu_csv(path: str, units: str) -> tuple[np.ndarray, np.ndarray | None] | common.Problem:
    """Reads a CSV with header ax,ay,az,gx,gy,gz[,t] -> (imu (N, 6) SI, t (N,) or None), or a Problem."""
    if not os.path.isfile(path):
        return common.Problem("missing file", f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = [name.strip() for name in next(csv.reader(f), [])]
        values = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return common.Problem("unreadable file", f"{path}: {error}")
    missing = [name for name in CSV_IMU_COLUMNS if name not in header]
    if missing or values.shape[1] != len(header):
        return common.Problem("wrong columns", f"{path}: header {header} lacks {missing or 'a column per value'}")
    imu = values[:, [header.index(name) for name in CSV_IMU_COLUMNS]]
    if units == "g":
        imu[:, :3] *= common.STANDARD_GRAVITY
    return imu, values[:, header.index("t")] if "t" in header else None


def csv_source(
    csv_dir: str,
    labels_path: str,
    rate_hz: float,
    units: str,
    *,
    heldout_subjects: Sequence[str] = (),
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    expect_gravity: bool = True,
) -> HarSource:
    """A folder of IMU CSV files labelled by a labels CSV; splits by subject (or file without subjects)."""
    if units not in ("si", "g"):
        raise ValueError(f"--units must be 'si' or 'g', got {units!r}.")
    if rate_hz <= 0:
        raise ValueError(f"--rate must be positive, got {rate_hz}.")
    all_rows = _read_labels(labels_path)
    rows = [row for row in all_rows if row["file"] and row["label"]]
    incomplete = [line for line, row in enumerate(all_rows, start=2) if not (row["file"] and row["label"])]
    class_names = sorted({row["label"] for row in rows})
    groups = [row.get("subject") or row["file"] for row in rows]
    if heldout_subjects:
        _check_heldout(heldout_subjects, {row.get("subject", "") for row in rows}, labels_path)
        split_of = {group: _subject_split(group, heldout_subjects) for group in groups}
    else:
        split_of = common.split_by_group(groups, fractions, seed)

    files = [
        CsvFile(row["file"], os.path.join(csv_dir, row["file"]), units, rate_hz, class_names.index(row["label"]),
                row.get("subject", ""), split_of[group])
        for row, group in zip(rows, groups)
    ]
    return HarSource(
        name="csv",
        class_names=class_names,
        activities=[activity_phrase(name) for name in class_names],
        items=files,
        initial_drops=tuple(
            common.Problem("incomplete labels row", f"{labels_path}: line {line} lacks its file or label")
            for line in incomplete
        ),
        input_description=f"CSV folder {csv_dir} labelled by {labels_path}",
        expect_gravity=expect_gravity,
        split_rule=(
            f"by subject: heldout = subjects {list(heldout_subjects)}, train = the rest"
            if heldout_subjects
            else f"by {'subject' if any(row.get('subject') for row in rows) else 'file'}, fractions "
            f"{fractions or common.DEFAULT_SPLIT_FRACTIONS}, seed {seed}"
        ),
    )


@dataclasses.dataclass(frozen=True)
class HarJob:
    """A HarSource windowed as a `data_prep.parallel` job; `process` is the per-recording function.

    The class prototypes (`class_embeddings`, (classes, D) or None) are embedded once, before
    the job is built, so a worker needs no tower.
    """

    source: HarSource
    T: int
    rate_hz: float
    hop: int
    prompts: dict[str, list[str]]
    class_embeddings: np.ndarray | None
    writer_header: dict

    def catalog(self) -> tuple[list, str]:
        return self.source.items, self.source.input_description

    def setup(self) -> None:
        return None

    def header(self, _context) -> dict:
        return self.writer_header

    def new_report(self) -> common.Report:
        report = common.Report(self.source.name)
        for problem in self.source.initial_drops:
            report.drop(*problem)
        return report

    def process(self, item, _context) -> tuple[str, list[Window], common.Report]:
        """Loads, checks, resamples to rate_hz and cuts one recording into windows of T every hop."""
        report, T, rate_hz = common.Report(self.source.name), self.T, self.rate_hz
        recording = item.load()
        if isinstance(recording, common.Problem):
            report.drop(*recording)
            return item.split, [], report
        problem = common.check_imu(
            recording.imu, recording.recording_id, timestamps_s=recording.timestamps_s,
            max_gap_s=MAX_GAP_SAMPLES / recording.rate_hz, expect_gravity=self.source.expect_gravity,
        )
        if problem:
            report.drop(*problem)
            return recording.split, [], report
        label = recording.label
        windows = cut_windows(
            recording, T=T, rate_hz=rate_hz, hop=self.hop, text=self.prompts[self.source.class_names[label]][0],
            text_emb=None if self.class_embeddings is None else self.class_embeddings[label],
            source=self.source.name, report=report,
        )
        return recording.split, windows, report

    def failed(self, item, error: Exception) -> common.Report:
        report = common.Report(self.source.name)
        report.drop("failed recording", f"{item.recording_id}: {type(error).__name__}: {error}")
        return report


def cut_windows(
    recording: Recording, *, T: int, rate_hz: float, hop: int, text: str, text_emb: np.ndarray | None, source: str,
    report: common.Report,
) -> list[Window]:
    """A checked recording resampled to rate_hz and cut into windows of T samples every hop.

    Every window carries the recording's label and the narration (text, text_emb). The kept
    windows are counted in `report` under the recording's split; a recording shorter than one
    window is dropped there with the reason "shorter than window".
    """
    imu = common.resample(recording.imu, recording.rate_hz, rate_hz).astype(np.float32)
    starts = common.window_starts(len(imu), T, hop)
    if len(starts) == 0:
        report.drop("shorter than window", f"{recording.recording_id}: {len(imu)} samples at {rate_hz} Hz < T={T}")
        return []
    windows = [
        Window(
            imu=imu[start : start + T], rate_hz=rate_hz, text=text, text_emb=text_emb, label=recording.label,
            source=source, recording_id=recording.recording_id, subject=recording.subject,
            start_s=start / rate_hz, end_s=(start + T) / rate_hz,
        )
        for start in starts
    ]
    report.keep(recording.split, len(windows))
    return windows


def write_har_dataset(
    source: HarSource,
    out_dir: str,
    *,
    T: int = 250,
    rate_hz: float = 50.0,
    hop: int | None = None,
    text_tower: towers.TextTower | None = None,
    overwrite: bool = False,
    driver: parallel.Driver = parallel.Driver(),
) -> common.Report:
    """Windows every recording of `source` into a dataset in out_dir with `driver`; returns the Report.

    Writes report.json in out_dir. Raises common.NothingUsable (and publishes no dataset)
    when no window is kept.
    """
    hop = T // 2 if hop is None else hop
    prompts = {name: class_prompts(activity) for name, activity in zip(source.class_names, source.activities)}
    class_embeddings = None
    if text_tower is not None:
        flat = [prompt for name in source.class_names for prompt in prompts[name]]
        embeddings = text_tower.embed(flat, progress=False)
        prototypes = embeddings.reshape(len(source.class_names), len(PROMPT_TEMPLATES), -1).mean(axis=1)
        class_embeddings = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    header = {
        "T": T, "rate_hz": rate_hz, "text_dim": text_tower.dim if text_tower else 0, "video_dim": 0,
        "towers": {"text": text_tower.describe()} if text_tower else {}, "class_names": source.class_names,
        "extra": {"source": source.name, "prompts": prompts, "split_rule": source.split_rule, "hop": hop},
    }
    job = HarJob(source, T, rate_hz, hop, prompts, class_embeddings, header)
    return parallel.prepare(job, out_dir, driver=driver, overwrite=overwrite)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fractions(text: str) -> dict[str, float]:
    """"train=0.8,val=0.1,test=0.1" -> {"train": 0.8, "val": 0.1, "test": 0.1}."""
    fractions = {}
    for pair in _comma_list(text):
        name, _, value = pair.partition("=")
        try:
            fractions[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{pair!r} is not NAME=FRACTION") from None
    return fractions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.har", description="Labelled HAR IMU data -> primus_jax dataset (TFRecord shards)."
    )
    parser.add_argument("--dataset", required=True, choices=("watch", "basicmotions", "csv"))
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and report.json")
    parser.add_argument("--target-rate", type=float, default=50.0, help="output IMU rate in Hz")
    parser.add_argument("--T", type=int, default=250, help="window length in samples at the target rate")
    parser.add_argument("--hop", type=int, help="samples between window starts (default T/2)")
    parser.add_argument("--text-tower", default="minilm", help=f"text tower: {towers.TOWER_SPECS}")
    parser.add_argument("--heldout-subjects", type=_comma_list,
                        help="comma-separated subjects for split 'heldout' (watch default: 8,9,10)")
    parser.add_argument("--csv-dir", help="csv: folder of IMU CSV files")
    parser.add_argument("--labels", help="csv: labels CSV with header file,label[,subject]")
    parser.add_argument("--rate", type=float, help="csv: sampling rate of the CSV files in Hz")
    parser.add_argument("--units", choices=("si", "g"), default="si", help="csv: accelerometer units")
    parser.add_argument("--no-gravity", action="store_true",
                        help="csv: the accelerometer has gravity removed (skip the gravity-magnitude unit check)")
    parser.add_argument("--splits", type=_fractions, default=None,
                        help="csv without --heldout-subjects: split fractions, e.g. train=0.8,val=0.1,test=0.1")
    parser.add_argument("--seed", type=int, default=0, help="csv: seed of the group-to-split assignment")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parallel.add_driver_arguments(parser)
    return parser


def source_from_args(args: argparse.Namespace) -> HarSource:
    if args.dataset == "watch":
        return watch_source(args.heldout_subjects or DEFAULT_HELDOUT_WATCH_SUBJECTS)
    if args.dataset == "basicmotions":
        return basicmotions_source()
    missing = [flag for flag, value in (("--csv-dir", args.csv_dir), ("--labels", args.labels), ("--rate", args.rate))
               if value is None]
    if missing:
        raise ValueError(f"--dataset csv needs {', '.join(missing)}.")
    return csv_source(
        args.csv_dir, args.labels, args.rate, args.units, heldout_subjects=args.heldout_subjects or (),
        fractions=args.splits, seed=args.seed, expect_gravity=not args.no_gravity,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; bad input or no usable window prints one error sentence and returns 1."""
    args, driver = parallel.parse_args(build_parser(), argv)
    try:
        out = paths.check_access(args.out)  # refuse a bad scheme or bucket before any work
        report = write_har_dataset(
            source_from_args(args), out, T=args.T, rate_hz=args.target_rate, hop=args.hop,
            text_tower=towers.load_text_tower(args.text_tower), overwrite=args.overwrite, driver=driver,
        )
    except (common.NothingUsable, parallel.WorkerDied, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    # Run the importable data_prep.har, not this __main__ copy: worker processes must unpickle its classes.
    from data_prep import har as importable

    sys.exit(importable.main())
