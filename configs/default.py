"""The paper's pretraining settings (docs/design.md §5), for a prepared Ego4D / Ego-Exo4D dataset.

    python -m primus_jax.main --config configs/default.py --workdir DIR \
        --config.data.dir=PREPARED_DATASET_DIR

Every field can be overridden on the command line as `--config.a.b=value`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "pretrain"
    config.seed = 0

    # Prepared dataset (a data_prep output directory with manifest.json).
    config.data = ml_collections.ConfigDict()
    config.data.dir = ""
    config.data.train_split = "train"
    config.data.val_split = "val"  # "" disables validation
    config.data.shuffle = True
    config.data.prefetch = 2  # batches decoded ahead, per worker and in the main process
    config.data.workers = -1  # decoding processes; -1: the host's usable cores minus one, 0: none
    config.data.skip_corrupt = False  # True: skip and count corrupt records instead of stopping
    # Several datasets drawn with weights into every global batch: "egoexo4d:0.7,ego4d:0.3" (names
    # under data.dir, or absolute / gs:// folders). In a config file a list works too:
    #   with config.data.ignore_type(): config.data.mixture = ("egoexo4d:0.7", "ego4d:0.3")
    # "" trains on data.dir alone. See primus_jax/data/mixture.py.
    config.data.mixture = ""

    # Encoder (docs/design.md §1). The window length T and rate come from the dataset manifest.
    config.model = ml_collections.ConfigDict()
    config.model.hidden_dim = 512
    config.model.conv_channels = 32
    config.model.pooled_length = 32
    config.model.ssl_dim = 512
    config.model.mm_dim = 512  # must equal the dataset's text/video embedding dimension
    config.model.gru_over = "channels"  # the reference's quirk; "time" is the time-major variant
    config.model.dtype = "float32"  # compute dtype of activations: "float32" or "bfloat16"
    # float32 matmuls/convs: "default" (TF32 on recent NVIDIA GPUs, one bf16 pass on TPU, float32 on
    # CPU), "high" or "highest" (float32 everywhere); see primus_jax/precision.py and docs/pretraining.md.
    config.model.matmul_precision = "default"

    # Objective (docs/design.md §2): alpha = ssl_coeff; each term can be switched off.
    config.objective = ml_collections.ConfigDict()
    config.objective.method = "primus"  # or "multitask_ssl" (configs/ablations.py:multitask_ssl)
    config.objective.alpha = 0.5
    config.objective.use_ss = True
    config.objective.use_mm_text = True
    config.objective.use_mm_video = True
    config.objective.use_nn = True
    config.objective.temperature_init = 0.1
    config.objective.augmentations = ("scaling", "permute")  # what the reference actually runs
    config.objective.nn_retrieve_by = "auto"  # video, then text, then IMU; "imu" forces IMU features
    # Contrastive negatives: 1 = the whole global batch; k = each sample's block of G/k consecutive
    # samples (the number of devices: each device's own batch, as the reference's per-GPU 16).
    config.objective.negative_groups = 1

    config.queue = ml_collections.ConfigDict()
    config.queue.size = 8192

    # Adam, lr 2e-4, no schedule, no clipping, no weight decay (docs/design.md §5). primus_jax/optimizer.py
    # gives the schedules' formulas.
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-4  # the peak rate of a schedule
    config.optim.schedule = "constant"  # "constant", "cosine" or "linear", each after warmup_steps
    config.optim.warmup_steps = 0  # linear from 0 to learning_rate over these updates
    config.optim.decay_steps = 0  # cosine / linear reach their end here; 0: the run's length
    config.optim.end_learning_rate_factor = 0.0  # cosine / linear end at this fraction of learning_rate
    config.optim.clip_norm = 0.0  # > 0: clip gradients to this global L2 norm; 0: no clipping
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0

    config.train = ml_collections.ConfigDict()
    # Reference: 16 per GPU on 4 GPUs with per-GPU negatives; we draw negatives from the global batch.
    config.train.global_batch_size = 64
    config.train.num_epochs = 15
    config.train.num_steps = 0  # > 0 overrides num_epochs
    config.train.log_every = 50
    config.train.eval_every = 1000  # steps; validation also runs at the end
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 2
    config.train.max_nonfinite_in_a_row = 20
    config.train.export = True
    # (start, stop): a jax.profiler trace of the updates from step start to step stop (metrics rows
    # start + 1 .. stop) under <workdir>/tensorboard, for TensorBoard's profile tab; () is off.
    config.train.profile_steps = ()

    # Evaluators run during pretraining, big_vision-style: {name: dict(type=..., every=..., ...)}
    # with type "fewshot", "zeroshot" or "retrieval"; see primus_jax/evaluators.py and configs/pod.py.
    config.evals = ml_collections.ConfigDict()

    # Multi-host: "auto" initialises jax.distributed when the environment describes a cluster
    # (TPU pods, SLURM, or the coordinator fields below); "never" and "always" force it.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = "auto"
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = 0
    config.distributed.process_id = -1
    config.distributed.heartbeat_timeout_s = 100  # a process that loses a peer fails after this
    return config
