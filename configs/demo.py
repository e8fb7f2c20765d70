"""The embedded real-data demo: prepare, pretrain PRIMUS and its baselines, evaluate with the suite.

    python -m primus_jax.main --config configs/demo.py --workdir runs/demo

1. data_prep.har writes the seglearn smartwatch exercises (50 Hz; subjects 8-10 held out; a window
   every demo.watch_hop samples) and UEA BasicMotions (10 Hz, upsampled to 50 Hz) as TFRecord
   datasets under <workdir>/data, with MiniLM embeddings of activity prompts as weak narrations.
2. PRIMUS (SS + MM-text + NN), SimCLR-only (alpha = 1), MM-only (IMU2CLIP-like) and MultitaskSSL
   encoders are pretrained on the 7 training subjects' windows at equal budgets: each for
   demo.comparison_steps steps, once per pretraining seed (demo.seeds; per seed the same
   initialisation and data order for every method). The first seed's PRIMUS run then continues
   to train.num_steps steps for the export. Budget: 4 methods x 2 seeds x 200 steps + 800 more
   PRIMUS steps = 2,400 steps, the step count of the earlier demo whose whole run (with data
   preparation and evaluation) took 472 s on 2 cores.
3. primus_jax.suite evaluates the exports, a random-init encoder and the per-channel-statistics
   floor: few-shot linear probes on frozen ssl- and mmcl-head features, in-domain on the held-out
   subjects (shots from subjects 8 and 9, test on 10) and out-of-domain on BasicMotions (its own
   train / test recordings); zero-shot for the encoders that learnt text.
4. demo.md (the equal-budget table: mean ± standard error over seeds, orderings only where gaps exceed
   the errors, MultitaskSSL's held-out transformation recognition), suite.json, suite.md and
   suite.png (every encoder and seed) in <workdir>; the PRIMUS export in <workdir>/export.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.mode = "demo"
    config.data.dir = ""  # the demo points it at <workdir>/data/watch
    config.data.val_split = ""  # the held-out subjects are for evaluation only
    config.model.mm_dim = 384  # MiniLM's embedding width
    config.objective.use_mm_video = False
    config.queue.size = 1024
    config.train.global_batch_size = 64
    config.train.num_steps = 1000  # the PRIMUS export a newcomer takes away (seed demo.seeds[0], continued)
    config.train.log_every = 10
    config.train.checkpoint_every = 100

    config.demo = ml_collections.ConfigDict()
    config.demo.data_root = ""  # default: <workdir>/data; prepared datasets found there are reused
    config.demo.text_tower = "minilm"
    # A folder of BVH motion capture (e.g. Bandai-Namco's): data_prep.mocap synthesises IMU from it into
    # <data_root>/mocap and every pretraining batch becomes half watch, half mocap windows. "": watch only.
    config.demo.mocap_dir = ""
    config.demo.heldout_subjects = "8,9,10"
    # The suite tests on the last third of the held-out subjects (10); the others (8, 9) give the shots.
    config.demo.methods = ("primus", "simclr", "imu2clip", "multitask_ssl")  # names from configs/ablations.py
    # Every method and seed pretrains for comparison_steps (0: train.num_steps), the comparison's budget;
    # seeds: pretraining seeds per method (config.seed, config.seed + 1, ...).
    config.demo.comparison_steps = 200
    config.demo.seeds = 2
    config.demo.watch_hop = 50  # samples between watch window starts (1 s; 0: T/2 = 2.5 s)
    # Frozen features probed: the ssl head (augmentation-invariant) and the mmcl head (text space,
    # the reference's downstream feature). With 7 class names as the only narrations, mmcl is
    # pulled towards a 7-point text space; the README's demo result shows what that does out of domain.
    config.demo.features = ("ssl", "mmcl")
    config.demo.shots = (1, 2, 5, 10, 20)
    config.demo.table_shots = 10
    config.demo.trials = 5
    config.demo.seed = 0
    return config
