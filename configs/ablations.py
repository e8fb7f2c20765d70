"""Baselines and ablations of the PRIMUS objective, as configurations of default.py.

    python -m primus_jax.main --config configs/ablations.py:simclr --workdir DIR ...

Names:
  primus    the full objective (same as default.py)
  simclr    SS only (alpha = 1), NN retrieval by IMU features: SimCLR-like
  imu2clip  MM only (IMU<->text and IMU<->video), no SS, no NN: IMU2CLIP-like
  no_ss     PRIMUS without L_SS
  no_mm     PRIMUS without L_MM (NN terms kept)
  no_nn     PRIMUS without L_NN
  multitask_ssl  MultitaskSSL (Saeed et al. 2019): recognise which of eight transformations was
                 applied, one binary head each (primus_jax/multitask.py); no text, video or NN
"""
import ml_collections

from configs import default

ABLATIONS = {
    "primus": {},
    "simclr": {"alpha": 1.0, "use_mm_text": False, "use_mm_video": False, "nn_retrieve_by": "imu"},
    "imu2clip": {"alpha": 0.0, "use_ss": False, "use_nn": False},
    "no_ss": {"use_ss": False},
    "no_mm": {"use_mm_text": False, "use_mm_video": False},
    "no_nn": {"use_nn": False},
    "multitask_ssl": {"method": "multitask_ssl", "use_ss": False, "use_mm_text": False, "use_mm_video": False,
                      "use_nn": False},
}


def get_config(name: str = "primus") -> ml_collections.ConfigDict:
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}")
    config = default.get_config()
    config.objective.update(ABLATIONS[name])
    return config
