"""Motion capture (BVH) -> synthetic IMU at virtual body sites -> a primus_jax dataset.

    python -m data_prep.mocap --bvh-dir DIR --out DIR [--sites wrist_l,wrist_r,waist,thigh_r]
        [--labels filename|CSV] [--towers minilm|none|clip:...] [--workers N | --runner ...]

Synthesis (sites, mounting, accelerometer, gyroscope, noise, the rest check) is in
`data_prep.virtual_imu`.

The IMU (N, 6) is resampled to --target-rate and cut into windows as by `data_prep.har`.
Narrations come from labels: the action and the style, from the file name (`<collection>_<action>_
<style>_<take>.bvh`, as Bandai-Namco names them) or a CSV with header file,action[,style]. They
become phrases with the templates in data_prep/mocap_templates.txt ("a person waving goodbye
happily"; with --site-in-text, "..., with the sensor on the left wrist"), embedded once by the
text tower. A window's label is its action (class_names are the actions).

Short clips (--short): "drop" drops a site recording shorter than one window; "mirror" extends a
clip of at least --min-seconds by playing its motion forward and backward (a palindrome loop of
the poses, so the sensor neither stops nor jumps, it reverses) until one window fits.

Bad input (unknown channels, a frame time <= 0, fewer frames than the header says, units that
cannot be inferred, a skeleton without the joints a site needs, a synthesised |acc| at rest far
from g) drops the clip with one sentence naming the file and the problem, in report.json, whose
"clips" lists every clip kept and every clip dropped with its reason. The run goes on.
"""
from __future__ import annotations

import argparse
import configparser
import csv
import dataclasses
import os
import re
import sys
from typing import Sequence


from data_prep import bvh, common, har, parallel
from data_prep.virtual_imu import DEFAULT_SITES, JOINT_MAPS, SITES, ClipProblem, Synthesis, synthesize
from primus_jax import paths, towers

SOURCE = "mocap"
TEMPLATES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mocap_templates.txt")


@dataclasses.dataclass(frozen=True)
class ClipItem:
    """One BVH file to process, with its labels and split."""

    path: str
    name: str
    action: str
    style: str
    split: str


# ------------------------------------------------------------------------------ narrations


def read_templates(path: str = TEMPLATES_PATH) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # labels keep their case
    parser.read(path, encoding="utf-8")
    return parser


def narration(templates: configparser.ConfigParser, action: str, style: str, site: str | None) -> str:
    """The phrase for an action, a style ("" for none) and a site phrase (None: not mentioned)."""
    action_phrase = templates["actions"].get(action) or har.activity_phrase(action.replace("-", " "))
    style_phrase = templates["styles"].get(style, f"in a {style.replace('-', ' ')} way") if style else ""
    key = "narration" if site is None else "narration_with_site"
    text = templates["templates"][key].format(action=action_phrase, style=style_phrase, site=site)
    return re.sub(r"\s+,", ",", " ".join(text.split()))


# ------------------------------------------------------------------------------ labels and job


_TAKE = re.compile(r"^\d+$")


def labels_from_name(name: str) -> tuple[str, str]:
    """(action, style) from a file name: fields split by "_" after a trailing take number is dropped;
    <collection>_<action>_<style> or <action>_<style> or <action>."""
    fields = os.path.splitext(os.path.basename(name))[0].split("_")
    if len(fields) > 1 and _TAKE.match(fields[-1]):
        fields = fields[:-1]
    if len(fields) >= 3:
        return fields[-2], fields[-1]
    return fields[0], fields[1] if len(fields) == 2 else ""


def list_clips(bvh_dir: str, labels: str) -> tuple[list[tuple[str, str, str, str]], list[common.Problem]]:
    """[(path, name, action, style)] of the .bvh files under bvh_dir (sorted by relative path), labelled
    from their names ("filename") or a CSV with header file,action[,style]; and the problems found."""
    if not os.path.isdir(bvh_dir):
        raise FileNotFoundError(f"--bvh-dir {bvh_dir} is not a folder.")
    found = sorted(os.path.relpath(os.path.join(root, f), bvh_dir)
                   for root, _, files in os.walk(bvh_dir) for f in files if f.lower().endswith(".bvh"))
    if labels == "filename":
        return [(os.path.join(bvh_dir, name), name, *labels_from_name(name)) for name in found], []
    with open(labels, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"file", "action"} <= set(rows[0]):
        raise ValueError(f"Labels file {labels}: needs a header file,action[,style] and rows.")
    by_file = {row["file"].strip(): row for row in rows}
    clips, problems = [], []
    for name in found:
        row = by_file.get(name) or by_file.get(os.path.basename(name))
        if row is None or not (row.get("action") or "").strip():
            problems.append(common.Problem("unlabelled clip", f"{name}: no action for it in {labels}"))
            continue
        clips.append((os.path.join(bvh_dir, name), name, row["action"].strip(), (row.get("style") or "").strip()))
    return clips, problems


class MocapReport(common.Report):
    """A Report that also lists every clip kept and every clip dropped with its reason ("clips")."""

    def __init__(self, source: str):
        super().__init__(source)
        self.kept_clips: list[str] = []
        self.dropped_clips: dict[str, str] = {}

    def merge(self, other: "MocapReport") -> None:
        super().merge(other)
        self.kept_clips.extend(other.kept_clips)
        self.dropped_clips.update(other.dropped_clips)

    @classmethod
    def from_dict(cls, content: dict) -> "MocapReport":
        report = super().from_dict(content)
        report.kept_clips.extend(content.get("clips", {}).get("kept", []))
        report.dropped_clips.update(content.get("clips", {}).get("dropped", {}))
        return report

    def as_dict(self) -> dict:
        return {**super().as_dict(), "clips": {"kept": self.kept_clips, "dropped": self.dropped_clips}}

    def summary(self) -> str:
        return f"{super().summary()}\n  clips: {len(self.kept_clips)} kept, {len(self.dropped_clips)} dropped"


@dataclasses.dataclass(frozen=True)
class MocapJob:
    """Per-clip synthesis and windowing as a `data_prep.parallel` job (see that module)."""

    clips: tuple[ClipItem, ...]
    listing_problems: tuple[common.Problem, ...]
    bvh_dir: str
    settings: Synthesis
    T: int
    rate_hz: float
    hop: int
    class_names: tuple[str, ...]
    texts: dict  # (action, style, site or "") -> narration
    embeddings: dict  # narration -> (D,) embedding, empty without a text tower
    writer_header: dict

    def catalog(self) -> tuple[list, str]:
        return list(self.clips), f"BVH folder {self.bvh_dir}"

    def setup(self) -> None:
        return None

    def header(self, _context) -> dict:
        return self.writer_header

    def new_report(self) -> MocapReport:
        report = MocapReport(SOURCE)
        for problem in self.listing_problems:
            report.drop(*problem)
        return report

    def process(self, item: ClipItem, _context) -> tuple[str, list, MocapReport]:
        """Reads, synthesises every site and windows it; a bad clip is dropped with its one sentence."""
        report = MocapReport(SOURCE)
        try:
            clip = bvh.read(item.path)
            imus, rate_hz = synthesize(clip, self.settings, item.name)
        except bvh.BvhError as error:
            return item.split, [], self._drop(report, item, "bad bvh", str(error))
        except ClipProblem as error:
            return item.split, [], self._drop(report, item, error.reason, str(error))
        windows = []
        label = self.class_names.index(item.action)
        for site, imu in imus.items():
            recording = har.Recording(f"{item.name}:{site}", imu, rate_hz, label, "", item.split)
            long_enough = len(imu) * self.rate_hz / rate_hz >= self.T  # else cut_windows drops it as too short
            problem = common.check_imu(imu, recording.recording_id) if long_enough else None
            if problem:
                report.drop(*problem)
                continue
            text = self.texts[(item.action, item.style, site)]
            windows += har.cut_windows(recording, T=self.T, rate_hz=self.rate_hz, hop=self.hop, text=text,
                                       text_emb=self.embeddings.get(text), source=SOURCE, report=report)
        if windows:
            report.kept_clips.append(item.name)
        else:
            report.dropped_clips[item.name] = "no window: every site recording is shorter than one window or unusable"
        return item.split, windows, report

    @staticmethod
    def _drop(report: MocapReport, item: ClipItem, reason: str, sentence: str) -> MocapReport:
        report.drop(reason, sentence)
        report.dropped_clips[item.name] = sentence
        return report

    def failed(self, item: ClipItem, error: Exception) -> MocapReport:
        report = MocapReport(SOURCE)
        return self._drop(report, item, "failed clip", f"{item.path}: {type(error).__name__}: {error}")


def write_mocap_dataset(
    bvh_dir: str,
    out_dir: str,
    settings: Synthesis = Synthesis(),
    *,
    labels: str = "filename",
    site_in_text: bool = False,
    T: int = 250,
    rate_hz: float = 50.0,
    hop: int | None = None,
    fractions: dict[str, float] | None = None,
    split_seed: int = 0,
    text_tower: towers.TextTower | None = None,
    overwrite: bool = False,
    driver: parallel.Driver = parallel.Driver(),
) -> MocapReport:
    """Synthesises IMU from every clip under bvh_dir into a dataset in out_dir; returns the report.

    Splits go by clip (`common.split_by_group` with `fractions`, default all "train"). Raises
    common.NothingUsable when no window is kept (report.json is still written).
    """
    unknown = [site for site in settings.sites if site not in SITES]
    if unknown:
        raise ValueError(f"--sites: unknown sites {unknown}; choose from {', '.join(SITES)}.")
    hop = T // 2 if hop is None else hop
    settings = dataclasses.replace(settings, window_seconds=T / rate_hz)  # what --short mirror extends to
    listed, problems = list_clips(bvh_dir, labels)
    split_of = common.split_by_group([name for _, name, _, _ in listed], fractions or {"train": 1.0}, split_seed)
    clips = tuple(ClipItem(path, name, action, style, split_of[name]) for path, name, action, style in listed)
    templates = read_templates()
    texts = {(c.action, c.style, site): narration(templates, c.action, c.style,
                                                  SITES[site].phrase if site_in_text else None)
             for c in clips for site in settings.sites}
    distinct = sorted(set(texts.values()))
    embeddings = {}
    if text_tower is not None and distinct:
        embeddings = dict(zip(distinct, text_tower.embed(distinct, progress=False)))
    class_names = tuple(sorted({c.action for c in clips}))
    header = {
        "T": T, "rate_hz": rate_hz, "text_dim": text_tower.dim if text_tower else 0, "video_dim": 0,
        "towers": {"text": text_tower.describe()} if text_tower else {}, "class_names": list(class_names),
        "extra": {"source": SOURCE, "hop": hop, "synthesis": dataclasses.asdict(settings),
                  "site_in_text": site_in_text, "split_rule": f"by clip, fractions {fractions or {'train': 1.0}}"},
    }
    job = MocapJob(clips, tuple(problems), bvh_dir, settings, T, rate_hz, hop, class_names, texts, embeddings, header)
    return parallel.prepare(job, out_dir, driver=driver, overwrite=overwrite)


# ------------------------------------------------------------------------------ CLI


def _joint_map(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for pair in har._comma_list(text):
        role, sep, name = pair.partition("=")
        if not sep or role.strip() not in JOINT_MAPS["bandai"]:
            raise argparse.ArgumentTypeError(f"{pair!r} is not ROLE=JointName with a role among "
                                             f"{', '.join(JOINT_MAPS['bandai'])}")
        pairs.append((role.strip(), name.strip()))
    return tuple(pairs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.mocap",
                                     description="BVH motion capture -> synthetic IMU -> primus_jax dataset.")
    parser.add_argument("--bvh-dir", required=True, help="folder searched recursively for .bvh files")
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and report.json")
    parser.add_argument("--sites", type=har._comma_list, default=list(DEFAULT_SITES),
                        help=f"comma-separated sites among {', '.join(SITES)}")
    parser.add_argument("--labels", default="filename",
                        help="'filename' (<collection>_<action>_<style>_<take>.bvh) or a CSV file,action[,style]")
    parser.add_argument("--towers", "--text-tower", dest="text_tower", default="minilm",
                        help=f"text tower: {towers.TOWER_SPECS}")
    parser.add_argument("--site-in-text", action="store_true", help="name the sensor's site in the narration")
    parser.add_argument("--joint-map", type=_joint_map, default=(), help="ROLE=JointName,... for other skeletons")
    parser.add_argument("--units", choices=("auto", *bvh.UNITS), default="auto", help="length unit of the BVH files")
    parser.add_argument("--up", choices=("auto", *bvh.UP_AXES), default="auto", help="up axis of the BVH files")
    parser.add_argument("--mount", choices=("random", "none"), default="random",
                        help="random mounting rotation per clip and site, or none (the segment's own axes)")
    parser.add_argument("--noise", action="store_true", help="add the seeded bias and white-noise model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mounting rotations and noise")
    parser.add_argument("--short", choices=("mirror", "drop"), default="mirror", help="clips shorter than a window")
    parser.add_argument("--min-seconds", type=float, default=2.5, help="mirror: shortest clip to extend")
    parser.add_argument("--target-rate", type=float, default=50.0, help="output IMU rate in Hz")
    parser.add_argument("--T", type=int, default=250, help="window length in samples at the target rate")
    parser.add_argument("--hop", type=int, help="samples between window starts (default T/2)")
    parser.add_argument("--splits", type=har._fractions, default=None,
                        help="split fractions by clip, e.g. train=0.9,val=0.1 (default: all train)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parallel.add_driver_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; bad arguments or no usable window print one error sentence and return 1."""
    args, driver = parallel.parse_args(build_parser(), argv)
    settings = Synthesis(
        sites=tuple(args.sites), joint_map=args.joint_map, units=args.units, up=args.up, mount=args.mount,
        noise=args.noise, seed=args.seed, short=args.short, min_seconds=args.min_seconds,
    )
    try:
        out = paths.check_access(args.out)
        report = write_mocap_dataset(
            args.bvh_dir, out, settings, labels=args.labels, site_in_text=args.site_in_text, T=args.T,
            rate_hz=args.target_rate, hop=args.hop, fractions=args.splits, split_seed=args.seed,
            text_tower=towers.load_text_tower(args.text_tower), overwrite=args.overwrite, driver=driver,
        )
    except (common.NothingUsable, parallel.WorkerDied, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    # Run the importable data_prep.mocap, not this __main__ copy: worker processes must unpickle its classes.
    from data_prep import mocap as importable

    sys.exit(importable.main())
