"""Where the demo's time buys transfer: PRIMUS pretraining steps x watch window hop, scored by the suite.

    python -m benchmarks.demo_tradeoffs --workdir runs/tradeoffs [--hops 125,50] [--steps 300[,750,...]]
        [--record DIR]

For each hop the watch data is prepared with windows every `hop` samples (T = 250), and one PRIMUS
run of configs/demo.py trains on its training subjects; the run stops at each step count in turn
(resuming the same trajectory: Adam at a constant rate, so stopping changes nothing) and its
export is kept as `hop<h>-<steps>`. Then primus_jax.suite scores every export, a random-init
encoder and the statistics floor on the demo's two evaluation sets (the held-out watch subjects,
cut at the first hop given, and BasicMotions), ssl and mmcl heads. Writes <workdir>/suite/suite.md
and prints one JSON line with the wall time in seconds of every phase. Times depend on the machine's load: note `uptime`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from benchmarks import common
from configs import demo as demo_config
from primus_jax import demo, suite, suite_specs, train, towers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--hops", default="125,50")
    parser.add_argument("--steps", default="300")
    common.add_record_argument(parser)
    args = parser.parse_args()
    hops = [int(h) for h in args.hops.split(",")]
    steps = sorted(int(s) for s in args.steps.split(","))
    config = demo_config.get_config()
    text_tower = towers.load_text_tower(config.demo.text_tower)
    timings, exports = {}, []
    eval_paths = None
    for hop in hops:
        config.demo.watch_hop = hop
        start = time.perf_counter()
        paths = demo.prepare_data(config, os.path.join(args.workdir, f"data-hop{hop}"), text_tower)
        timings[f"prepare hop {hop}"] = time.perf_counter() - start
        eval_paths = eval_paths or paths
        run_dir = os.path.join(args.workdir, f"primus-hop{hop}")
        cfg = demo.method_config(config, "primus", paths["watch"])
        for n in steps:
            cfg.train.num_steps = n
            start = time.perf_counter()
            train.train_and_evaluate(cfg, run_dir)
            timings[f"train hop {hop} to step {n}"] = time.perf_counter() - start
            export = os.path.join(args.workdir, "exports", f"hop{hop}-{n}")
            shutil.rmtree(export, ignore_errors=True)
            shutil.copytree(os.path.join(run_dir, "export"), export)
            exports.append(f"PRIMUS hop {hop}, {n} steps={export}")
    settings = suite_specs.SuiteSettings(heads=("ssl", "mmcl"))
    encoders = [suite_specs.load_encoder_spec(spec) for spec in exports]
    encoders.append(suite_specs.load_encoder_spec(f"random init={suite_specs.RANDOM}", encoders[0], config.seed + 1))
    start = time.perf_counter()
    suite.run_suite(encoders, demo.suite_datasets(eval_paths, settings), os.path.join(args.workdir, "suite"), settings)
    timings["suite"] = time.perf_counter() - start
    seconds = {name: round(value, 1) for name, value in timings.items()}
    print(json.dumps(seconds))
    if args.record:
        common.record_result(args.record, "demo_tradeoffs", {"benchmark": "demo_tradeoffs", "seconds": seconds})


if __name__ == "__main__":
    main()
