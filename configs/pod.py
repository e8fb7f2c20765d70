"""The pretraining job as pod-scale users run it: the paper's objective and model (default.py) with a
two-dataset mixture, a warm-up + cosine learning-rate schedule, gradient clipping and downstream
evaluators during training.

    python -m primus_jax.main --config configs/pod.py --workdir gs://BUCKET/runs/primus \
        --config.data.dir=gs://BUCKET/prepared \
        --config.evals.fewshot.data_dir=gs://BUCKET/prepared/egoexo4d_downstream ...

data.dir is the folder that holds the prepared datasets the mixture names. The evaluators' data_dir
fields point at prepared labelled datasets (a train and a test split, class names, and for
zero-shot the class prompts); an evaluator whose dataset is missing is reported once and
switched off, and training goes on. Add `--config.train.profile_steps="(100, 110)"` for a profile.

Before renting the pod, compile this config for it on any machine (docs/pod.md):

    python -m primus_jax.compile --config configs/pod.py --topology v5e:16x16 --per_chip_batch 64
"""
import ml_collections

from configs import default

DOWNSTREAM = "/data/prepared/egoexo4d_downstream"  # replace, or override each evals.<name>.data_dir


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.mixture = "egoexo4d:0.7,ego4d:0.3"

    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 1000
    config.optim.clip_norm = 1.0

    config.evals.fewshot = dict(type="fewshot", every=2000, data_dir=DOWNSTREAM, train_split="train",
                                test_split="test", shots=(1, 5, 10), trials=3)
    config.evals.zeroshot = dict(type="zeroshot", every=2000, data_dir=DOWNSTREAM, split="test",
                                 text_tower="clip:/models/clip4clip-webvid150k")
    config.evals.retrieval = dict(type="retrieval", every=2000, data_dir=DOWNSTREAM, split="test", ks=(1, 5))
    return config
