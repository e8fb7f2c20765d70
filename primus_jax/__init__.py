"""primus_jax: PRIMUS IMU-encoder pretraining in JAX/Flax.

`primus_jax.load_encoder(export_dir)` is imported lazily so that `import primus_jax`
stays cheap for the data_prep tools.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "load_encoder":
        from primus_jax.checkpoint import load_encoder

        return load_encoder
    raise AttributeError(f"module 'primus_jax' has no attribute {name!r}")
