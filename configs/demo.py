"""The embedded real-data demo: prepare, pretrain PRIMUS and its baselines, evaluate, report.

    python -m primus_jax.main --config configs/demo.py --workdir runs/demo

1. data_prep.har writes the seglearn smartwatch exercises (50 Hz; subjects 8-10 held out) and
   UEA BasicMotions (10 Hz, upsampled to 50 Hz) as TFRecord datasets under <workdir>/data, with
   MiniLM embeddings of activity prompts as weak narrations (no video).
2. PRIMUS (SS + MM-text + NN), SimCLR-only (alpha = 1) and MM-only (IMU2CLIP-like) encoders are
   pretrained on the 7 training subjects' windows, from the same initialisation.
3. Few-shot linear probes on frozen ssl-head and mmcl-head features, against a random-init frozen encoder and
   standard training (random init, trained end to end on the shots): in-domain on the held-out
   subjects (shots from subjects 8 and 9, test on 10), out-of-domain on BasicMotions (its own
   train / test recordings). Zero-shot and IMU->text retrieval for the encoders that saw text.
4. results.json, results.md and accuracy_vs_shots.png in <workdir>; the PRIMUS encoder is
   exported to <workdir>/export.
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
    config.train.num_steps = 300
    config.train.log_every = 10
    config.train.checkpoint_every = 100

    config.demo = ml_collections.ConfigDict()
    config.demo.data_root = ""  # default: <workdir>/data; prepared datasets found there are reused
    config.demo.text_tower = "minilm"
    config.demo.heldout_subjects = "8,9,10"
    config.demo.indomain_test_subjects = "10"  # the other held-out subjects give the shots
    config.demo.methods = ("primus", "simclr", "imu2clip")  # pretrained; names from configs/ablations.py
    # Frozen features probed: the ssl head (augmentation-invariant) and the mmcl head (text space,
    # the reference's downstream feature). With 7 class names as the only narrations, mmcl is
    # pulled towards a 7-point text space; the README discusses what that does out of domain.
    config.demo.features = ("ssl", "mmcl")
    config.demo.shots = (1, 2, 5, 10, 20)
    config.demo.trials = 5
    config.demo.seed = 0
    config.demo.probe_steps = 500
    config.demo.standard_training = True  # the random-init end-to-end baseline
    # Standard training fine-tunes the whole encoder once per (shots, trial, set): 50 runs, so it
    # is kept short (25 AdamW steps of 32 windows at lr 1e-3) to fit the demo's time budget.
    config.demo.finetune_steps = 25
    config.demo.finetune_batch_size = 32
    config.demo.finetune_learning_rate = 1e-3
    return config
