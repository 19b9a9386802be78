"""Structured configuration: typed dataclasses, YAML files merged in order, `key=value` overrides.

    cfg = load_config(["lsor.yaml", "smoke.yaml"], overrides=["train.epochs=3"])

The dataclasses below are the schema: every key a YAML file or an override may set, with its
type and default. A key that is not in the schema, or a value of the wrong type, stops loading
with an error naming the key, where it came from and the keys that are valid there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hpcbrain.config_checks import ConfigError, check_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR_ENV = "HPCBRAIN_CONFIG_DIR"


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig:
    p: float = 0.5                   # probability that each augmentation is applied to an item
    flip: bool = True                # left-right (hemisphere) flip
    rotation_deg: float = 5.0        # max rotation about each axis
    translation_vox: float = 2.0     # max shift along each axis, in voxels
    cutout_size: int = 0             # edge of the zeroed box in voxels; 0 disables cutout
    noise_std: float = 0.0           # Gaussian noise std on z-scored intensities; 0 disables


@dataclass
class DataConfig:
    store: str = "runs/demo/cohort.zarr"   # the cohort store (`hpcbrain convert` output)
    # the volumes the model sees: auto (the store's shape), S (an S³ cube) or [D, H, W]; a
    # value that disagrees with the store stops the job before training
    input_size: Any = "auto"
    num_workers: int = 2             # DataLoader worker processes per rank
    pairs: str = "all"               # LSOR pairs: "all" i<j visits, or "consecutive"
    n_folds: int = 5                 # subject-level folds; 1 = no test split
    fold: int = 0                    # which fold is the test fold
    val_fraction: float = 0.1        # share of the non-test subjects held out for validation
    split_seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # where data.augment runs: device (a whole batch on the training device; the loader workers
    # only read) | workers (per item in the DataLoader workers, on their CPUs)
    augment_on: str = "device"
    # a scan whose bytes fail their checksum (changed at rest): stop (the read fails naming it)
    # | skip (its item is replaced by the next one, the scan counted and named at the epoch's
    # end and in RUN_DIR/corrupt-scans.tsv)
    on_corrupt_scan: str = "stop"


@dataclass
class ModelConfig:
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 16])  # encoder conv blocks
    # Contrastive methods (AdapN family) only; LSOR uses `widths` alone.
    backbone: str = "resnet18"       # resnet18 | resnet34 | lsor (LSOREncoder with `widths`)
    resnet_width: int = 64           # ResNet base width: stages w, 2w, 4w, 8w; features 8w (512)
    projection_hidden: Optional[int] = None   # projection head hidden size; None = feature dim
    projection_dim: int = 128        # projection head output (L2-normalised)
    features: str = "projection"     # evaluation features: projection (after head) | backbone


@dataclass
class TrainConfig:
    epochs: int = 50                 # all epochs, warm-up included
    batch_size: int = 64             # GLOBAL batch (pairs or scans); per rank = batch / world
    lr: float = 5e-4
    weight_decay: float = 1e-5
    seed: int = 0
    precision: str = "auto"          # auto (bf16 where supported) | bf16 | fp32
    deterministic: bool = False      # deterministic algorithms (for resume/equality tests)
    max_steps_per_epoch: Optional[int] = None   # cap steps per epoch (smoke tests, demos)
    log_every_steps: int = 10
    checkpoint_every_steps: Optional[int] = None   # also checkpoint mid-epoch (preemptible jobs)
    num_threads: Optional[int] = None           # torch intra-op threads on CPU; None = default
    channels_last: bool = True       # 3D conv weights in channels-last layout (~1.6× faster on CPU)
    # keep only each encoder/decoder block's input for the backward pass and recompute the
    # rest there: less activation memory for ~1 more forward pass (`hpcbrain plan` shows both)
    activation_checkpointing: bool = False
    # a Conv3d's weight gradient on a CPU: standard (oneDNN) | swapped (a forward convolution
    # with batch and channels swapped: 3-7x faster where oneDNN has no AVX-512 kernels) | auto
    # (measured once per CPU: hpcbrain/models/conv_weight_grad.py)
    conv_weight_grad: str = "auto"
    lr_step_every_epochs: Optional[int] = None  # lr × lr_gamma every this many epochs; None = constant
    lr_gamma: float = 1.0


@dataclass
class LSORConfig:
    # the SOM grid; "auto": sized to the training subjects (`methods.som_grid.auto_grid`: at
    # least 2 subjects a node, the paper's 1:2 aspect, its 4 × 8 from 64 training subjects up)
    grid_rows: Any = "auto"
    grid_cols: Any = "auto"
    warmup_epochs: int = 10          # reconstruction-only epochs before the SOM phase
    lambda_recon: float = 1.0
    lambda_commit: float = 0.5
    lambda_som: float = 1.0
    lambda_dir: float = 0.2
    tau_max: float = 1.0             # SOM neighbourhood width at the start of the SOM phase
    tau_min: float = 0.1             # ... and at its end
    ema_alpha: float = 0.99          # reference-trajectory EMA decay
    init: str = "kmeans"             # SOM start: kmeans (paper, official) | pca | longitudinal
    kmeans_max_iter: int = 300
    kmeans_n_init: int = 3           # k-means restarts at the SOM initialisation
    init_bn_mode: str = "batch"      # BatchNorm statistics of the k-means encoding: batch
                                     # (as training steps see latents; official) | running
    node_lr_scale: float = 1.0       # SOM nodes G learn at train.lr × this (paper: 1)
    som_ramp_epochs: float = 0.0     # SOM losses ramp in linearly over this many epochs (paper: 0)
    centred_nodes: bool = False      # nodes ride on an EMA of the latent mean (paper: false)
    centre_momentum: float = 0.5     # EMA decay of that centre, per training step


@dataclass
class BaselinesConfig:
    """LSOR's baselines on its autoencoder: ae, vae, lssl, lne (methods/longitudinal.py)."""
    lambda_recon: float = 1.0
    lambda_dir: float = 1.0          # LSSL's and LNE's direction loss
    vae_beta: float = 1.0            # VAE: weight of the per-dimension KL term
    lne_neighbours: int = 5          # LNE: neighbours per pair in the global batch (official 5)
    lne_sigma2: float = 100.0        # LNE: w = exp(-d²/σ²) (official 100)


@dataclass
class ContrastiveConfig:
    """The contrastive methods (adapn, exponential, threshold, yaware, rnc, simclr, nnclr)."""
    temperature: float = 0.1
    kernel: str = "rbf"              # label kernel: rbf | gaussian | cauchy
    sigma: float = 2.0               # kernel width in label units (years of age)
    nn_final: int = 14               # AdapN: neighbourhood size (scans) at the end of training
    nn_step: int = 1                 # AdapN: epochs between neighbourhood shrinks; 0 = no schedule
    distance: str = "manhattan"      # AdapN neighbours: manhattan | euclidean | chebyshev | cosine
                                     # | similarity (top-k dot product, official)
    far_lambda: Optional[float] = None   # AdapN appendix: weight non-nearest by (r/d)^λ; None = drop
    max_shift: bool = False          # AdapN/Exponential: the official code's s − max_t s (docs/adapn.md)
    # Official-code variants (configs/adapn-official.yaml turns them all on; docs/adapn.md)
    weight_norm: str = "anchor"      # kernel weights normalised per anchor (Eq. 2) | global (official)
    nn_epoch_base: int = 0           # Algorithm 1's epoch counted from 0 | 1 (official loop)
    nn_min_batch: int = 0            # AdapN: no neighbourhood (= Exponential) below this many
                                     # scans per global batch (official: 32)
    base_temperature: Optional[float] = None   # loss × temperature/base_temperature (official 0.07)
    rnc_similarity: str = "dot"      # Rank-N-Contrast: dot (z·z/τ) | neg_l2 (−‖z_i − z_k‖/τ, official)
    rnc_features: str = "projection" # ... on unit projections | backbone features (official)
    nnclr_queue: int = 1024          # NNCLR support set size (projections of earlier batches);
                                     # capped at the training set's scan count
    nnclr_exclude_self: bool = True  # NNCLR: the anchor's own scan (an earlier view) is never
                                     # its neighbour
    # The two views per scan are drawn from this (on top of data.augment, applied once per scan)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        p=0.5, flip=False, rotation_deg=0.0, translation_vox=0.0, cutout_size=0, noise_std=0.0))


@dataclass
class EvaluateConfig:
    """What the job evaluates on rank 0 after training."""
    ridge: bool = True               # methods with ridge_evaluation (the contrastive family, the
                                     # supervised bound): ridge age regression on frozen features
    ridge_seeds: int = 5             # inner-CV shuffles the ridge evaluation is repeated over
    ridge_cv: int = 5                # inner CV folds (by subject) choosing the ridge alpha
    ridge_alphas: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0,
                                                               100.0, 1000.0])
    # The registered age model's calibration (docs/brain-age.md), fitted on non-test subjects:
    age_calibration_subjects: str = "auto"   # auto | training (cross-fitted) | validation
                                     # (held out from the encoder too) | both | encoder-folds
                                     # (K extra trainings, each predicting its left-out
                                     # subjects: evaluate/encoder_folds.py); auto: validation
                                     # when the method trains on ages, else training
    age_calibration_folds: int = 5   # subject-grouped folds of the cross-fitted predictions
                                     # (encoder-folds: of the extra trainings)
    age_correction: str = "beheshti"  # the gap's age-bias correction: beheshti | delange
    age_interval_level: float = 0.90  # the conformal interval's default level


@dataclass
class SupervisedConfig:
    """The supervised upper bound (method ``supervised``): backbone → linear → age, MSE."""
    age_offset: float = 70.0         # target = (age − offset) / scale, years
    age_scale: float = 10.0


@dataclass
class TrackingConfig:
    uri: Optional[str] = None        # None: $MLFLOW_TRACKING_URI, else sqlite in the project
    experiment: str = "hpcbrain"
    registered_model: Optional[str] = "hpcbrain-lsor-encoder"   # None: do not register
    registered_age_model: Optional[str] = None   # contrastive runs: encoder + ridge head, age
                                     # per scan (`hpcbrain predict-age`); None: not logged
    alias: str = "current"
    enabled: bool = True
    on_unreachable: str = "fail"     # server silent at start: fail (seconds) | offline (spool)
    health_timeout_s: float = 5.0    # how long the start-up health check waits
    retry_s: float = 5.0             # metrics wait in the run folder's spool; retried this often
    finish_timeout_s: float = 30.0   # the end of a run waits at most this for metrics to leave
    outage_wait_s: float = 60.0      # the finishing phase waits at most this for a server that
                                     # stopped answering, then defers its uploads (exit 75)
    queue_size: int = 1000           # metric batches queued in memory before they spool to disk


@dataclass
class EngineConfig:
    """How steps run: one process, DDP or DeepSpeed (docs/distributed.md)."""
    name: str = "auto"               # auto (ddp if >1 process, else single) | single | ddp | deepspeed
    deepspeed_config: str = "deepspeed_zero2.json"   # JSON under configs/ or a path; its batch,
                                     # accumulation, clipping and precision keys are set from here
    zero_stage: Optional[int] = None # 0-3 overrides the JSON's stage; None keeps it
    grad_accum_steps: int = 1        # micro-batches per optimizer step (per-rank micro-batch =
                                     # train.batch_size / (world * grad_accum_steps))
    grad_clip: Optional[float] = None   # max global gradient norm; None or 0 = no clipping
    timeout_minutes: float = 30.0    # how long a collective waits for the other ranks while the
                                     # job starts, initialises (k-means), validates, checkpoints
    step_timeout_minutes: float = 2.0   # ... and during training steps, once one step has run:
                                     # a rank that died or hung is noticed within this
    backend: Optional[str] = None    # torch.distributed backend; None: nccl on GPU, gloo on CPU


@dataclass
class RunConfig:
    name: str = "lsor"               # run folder name under root
    root: str = "runs"               # where run folders live
    resume: bool = True              # continue from the run folder's latest checkpoint


@dataclass
class SlurmConfig:
    """How `launch/submit.py` asks Slurm for resources (cluster profiles live in slurm/profiles/)."""
    partition: Optional[str] = None  # None: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0           # one task per GPU; 0 = a CPU-only partition
    tasks_per_node: Optional[int] = None   # CPU partitions (default 1); with GPUs = gpus_per_node
    cpus_per_task: Optional[int] = None    # None: Slurm's default (1)
    mem_gb: Optional[float] = None   # per node; None: Slurm's default
    time_min: int = 60               # wall-time limit per (re)queued job, minutes
    signal_delay_s: int = 120        # USR2 this long before the time limit: checkpoint + requeue
    max_requeues: int = 3            # requeues after a time limit (preemptions do not count)
    constraint: Optional[str] = None
    # the GPU the nodes have (`hpcbrain plan --gpu` names: h100-80gb, a100-40gb, ...): submit.py
    # then checks that the job fits its memory before it waits in the queue
    gpu: Optional[str] = None
    exclude: Optional[str] = None
    array_parallelism: int = 16      # fold/sweep array elements running at once
    log_dir: Optional[str] = None    # submitit folder; None: <run.root>/slurm-logs/%j
    python: Optional[str] = None     # interpreter on the nodes; None: the one submitting
    setup: list[str] = field(default_factory=list)        # shell lines before srun (module load …)
    srun_args: list[str] = field(default_factory=list)    # extra srun arguments
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # more #SBATCH options


@dataclass
class Config:
    method: str = "lsor"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lsor: LSORConfig = field(default_factory=LSORConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def config_dirs() -> list[Path]:
    """Folders searched for a bare config file name, in order."""
    dirs = []
    if os.environ.get(CONFIG_DIR_ENV):
        dirs.append(Path(os.environ[CONFIG_DIR_ENV]))
    dirs.append(PROJECT_ROOT / "configs")
    return dirs


def resolve_config_path(name: str | Path) -> Path:
    """A path as given if it exists, else the file of that name under configs/."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.is_absolute():
        for folder in config_dirs():
            candidate = folder / path
            if candidate.is_file():
                return candidate.resolve()
    searched = ", ".join(str(d) for d in config_dirs())
    raise ConfigError(f"config file {name!s} not found (looked in the current folder and {searched})")


def _valid_keys(schema: DictConfig, dotted_key: str) -> list[str]:
    """The keys allowed next to `dotted_key` in the schema."""
    node: Any = schema
    for part in dotted_key.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _merge(cfg: DictConfig, update: DictConfig, source: str, schema: DictConfig) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as exc:
        key = exc.full_key or getattr(exc, "key", None) or "?"
        if isinstance(exc, ConfigKeyError):
            valid = ", ".join(_valid_keys(schema, key))
            raise ConfigError(f"{source}: unknown key '{key}'. Valid keys there: {valid}") from None
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: bad value for '{key}': {reason}") from None


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults, then each file in order, then `key=value` overrides; then
    `check_config`."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    for name in files:
        path = resolve_config_path(name)
        try:
            update = OmegaConf.load(path)
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"{path}: not a readable YAML config: {exc}") from None
        if not isinstance(update, DictConfig):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys, not a list")
        cfg = _merge(cfg, update, str(path), schema)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
        try:
            update = OmegaConf.from_dotlist([item])
        except Exception as exc:  # the value is parsed as YAML: yaml raises several types
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({reason}); "
                              f"quote it, e.g. key='\"a b\"'") from None
        cfg = _merge(cfg, update, f"override '{item}'", schema)
    OmegaConf.set_readonly(cfg, False)
    check_config(cfg)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically), so every run records what it ran."""
    from hpcbrain.atomic import write_text_atomic
    from hpcbrain.redact import redacted

    plain = redacted(OmegaConf.to_container(cfg, resolve=True))   # no credentials on disk
    return write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(plain)))


@dataclass(frozen=True)
class MethodSections:
    """What a method is built from (`Method.from_config`): its own section
    (`Method.config_section`: lsor, contrastive, baselines, supervised), the `model` section,
    the contrastive views' augmentation (which the supervised bound draws its view with), and
    the values the method takes from the run (input size, epochs, seed). No method reads the
    root config."""

    own: Any
    model: Any
    input_size: tuple[int, int, int]     # (D, H, W) of the volumes
    epochs: int
    seed: int
    views_augment: Any = None


def method_sections(cfg: DictConfig, section: str) -> MethodSections:
    """The sections of `cfg` a method whose own section is `section` is built from."""
    return MethodSections(own=cfg[section], model=cfg.model,
                          input_size=input_shape(cfg), epochs=int(cfg.train.epochs),
                          seed=int(cfg.train.seed), views_augment=cfg.contrastive.augment)


def input_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(D, H, W) of data.input_size once resolved against the store (`job.open_store`)."""
    from hpcbrain.volume_grid import as_shape

    value = cfg.data.input_size
    if value == "auto":
        raise ValueError("data.input_size is auto until the store is opened (job.open_store)")
    return as_shape(OmegaConf.to_object(value) if OmegaConf.is_config(value) else value)


def flatten_config(cfg: DictConfig) -> dict[str, Any]:
    """{'train.epochs': 50, ...}: the shape MLflow params want (credentials masked)."""
    from hpcbrain.redact import redacted

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(redacted(OmegaConf.to_container(cfg, resolve=True)), "")
    return flat
