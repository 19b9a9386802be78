"""Config values the schema's types cannot rule out: choices, ranges, relations between keys,
and the global batch against the ranks that will run it. `hpcbrain.config.load_config` calls
`check_config` on every config it returns; the launcher and the trainer call
`check_global_batch` with the world they plan or run.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["ConfigError", "CHOICES", "RANGES", "check_config", "check_global_batch"]


class ConfigError(ValueError):
    """A config file or override does not fit the schema."""


#: Keys whose value must be one of a few words (the code that reads them says what each means).
#: A table rather than Enum fields: OmegaConf would hand the code Enum members, whose str() and
#: MLflow params read "Precision.bf16" instead of "bf16".
CHOICES: dict[str, tuple[str, ...]] = {
    "data.pairs": ("all", "consecutive"),
    "data.augment_on": ("device", "workers"),
    "data.on_corrupt_scan": ("stop", "skip"),
    "model.backbone": ("resnet18", "resnet34", "lsor"),
    "model.features": ("projection", "backbone"),
    "train.precision": ("auto", "bf16", "fp32"),
    "lsor.init_bn_mode": ("batch", "running"),
    "lsor.init": ("kmeans", "pca", "longitudinal"),
    "tracking.on_unreachable": ("fail", "offline"),
    "contrastive.kernel": ("rbf", "gaussian", "cauchy"),
    "contrastive.distance": ("manhattan", "euclidean", "chebyshev", "cosine", "similarity"),
    "contrastive.weight_norm": ("anchor", "global"),
    "contrastive.rnc_similarity": ("dot", "neg_l2"),
    "contrastive.rnc_features": ("projection", "backbone"),
    "evaluate.age_calibration_subjects": ("auto", "training", "validation", "both",
                                          "encoder-folds"),
    "evaluate.age_correction": ("beheshti", "delange"),
    "train.conv_weight_grad": ("auto", "standard", "swapped"),
}
#: (key, lowest, highest, whether the lowest is allowed); None values are not checked.
RANGES: tuple[tuple[str, float, float, bool], ...] = (
    ("data.num_workers", 0, math.inf, True),
    ("data.n_folds", 1, math.inf, True),
    ("data.val_fraction", 0, 1, True),
    ("data.augment.p", 0, 1, True),
    ("train.epochs", 1, math.inf, True),
    ("train.batch_size", 1, math.inf, True),
    ("train.lr", 0, math.inf, False),
    ("train.weight_decay", 0, math.inf, True),
    ("train.log_every_steps", 1, math.inf, True),
    ("train.checkpoint_every_steps", 1, math.inf, True),
    ("train.num_threads", 1, math.inf, True),
    ("train.lr_step_every_epochs", 1, math.inf, True),
    ("train.lr_gamma", 0, math.inf, False),
    ("lsor.warmup_epochs", 0, math.inf, True),
    ("lsor.tau_max", 0, math.inf, False),
    ("lsor.tau_min", 0, math.inf, False),
    ("lsor.ema_alpha", 0, 1, True),
    ("lsor.node_lr_scale", 0, math.inf, False),
    ("lsor.som_ramp_epochs", 0, math.inf, True),
    ("lsor.centre_momentum", 0, 1, True),
    ("tracking.health_timeout_s", 0, math.inf, False),
    ("tracking.retry_s", 0, math.inf, False),
    ("tracking.finish_timeout_s", 0, math.inf, True),
    ("tracking.outage_wait_s", 0, math.inf, True),
    ("tracking.queue_size", 1, math.inf, True),
    ("contrastive.temperature", 0, math.inf, False),
    ("contrastive.sigma", 0, math.inf, False),
    ("contrastive.nn_final", 1, math.inf, True),
    ("contrastive.nn_min_batch", 0, math.inf, True),
    ("contrastive.nn_epoch_base", 0, 1, True),
    ("contrastive.base_temperature", 0, math.inf, False),
    ("contrastive.nnclr_queue", 1, math.inf, True),
    ("contrastive.augment.p", 0, 1, True),
    ("evaluate.ridge_seeds", 1, math.inf, True),
    ("evaluate.ridge_cv", 2, math.inf, True),
    ("evaluate.age_calibration_folds", 2, math.inf, True),
    ("evaluate.age_interval_level", 0, 1, False),
    ("supervised.age_scale", 0, math.inf, False),
    ("engine.grad_accum_steps", 1, math.inf, True),
    ("engine.timeout_minutes", 0, math.inf, False),
    ("engine.step_timeout_minutes", 0, math.inf, False),
    ("engine.zero_stage", 0, 3, True),
    ("slurm.nodes", 1, math.inf, True),
    ("slurm.gpus_per_node", 0, math.inf, True),
    ("slurm.time_min", 1, math.inf, True),
    ("slurm.signal_delay_s", 0, math.inf, True),
    ("slurm.max_requeues", 0, math.inf, True),
    ("slurm.array_parallelism", 1, math.inf, True),
)


def _check_grid(cfg: DictConfig) -> None:
    """lsor.grid_rows / grid_cols: both "auto" or both positive integers."""
    values = {key: OmegaConf.select(cfg, f"lsor.{key}") for key in ("grid_rows", "grid_cols")}
    autos = [v == "auto" for v in values.values()]
    if all(autos):
        return
    for key, value in values.items():
        if value == "auto":
            raise ConfigError(f"bad value for 'lsor.{key}': 'auto' with the other side given; "
                              f"set both to auto or both to a number of nodes")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"bad value for 'lsor.{key}': {value!r}; it must be auto or an "
                              f"integer ≥ 1")


def _check_input_size(cfg: DictConfig) -> None:
    """data.input_size: auto, S ≥ 8, or [D, H, W] with every side ≥ 8."""
    value = OmegaConf.select(cfg, "data.input_size")
    if value == "auto":
        return
    sides = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    sides = [sides] if not isinstance(sides, (list, tuple)) else sides
    if len(sides) not in (1, 3) or any(isinstance(s, bool) or not isinstance(s, int) or s < 8
                                       for s in sides):
        raise ConfigError(f"bad value for 'data.input_size': {value!r}; it must be auto (the "
                          f"store's shape), an integer S ≥ 8 (S³) or [D, H, W] with sides ≥ 8")


def check_config(cfg: DictConfig) -> None:
    """Values the schema's types cannot rule out: choices, ranges and the relations between
    keys. Raises ConfigError naming the key, its value and what it may be."""
    from hpcbrain.engine.registry import AUTO, engine_names  # the engines say who they are
    from hpcbrain.gpus import GPUS

    for key, allowed in {**CHOICES, "engine.name": (AUTO, *engine_names()),
                         "slurm.gpu": (None, *GPUS)}.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"bad value for '{key}': {value!r}; choose one of "
                              f"{', '.join('null' if a is None else a for a in allowed)}")
    _check_grid(cfg)
    _check_input_size(cfg)
    for key, low, high, low_ok in RANGES:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if not (value >= low if low_ok else value > low) or value > high:
            bound = (f"{'≥' if low_ok else '>'} {low:g}" + (f" and ≤ {high:g}"
                     if math.isfinite(high) else ""))
            raise ConfigError(f"bad value for '{key}': {value!r}; it must be {bound}")
    name = str(cfg.run.name)
    if not name or name in (".", "..") or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(f"bad value for 'run.name': {name!r}; it names a folder inside "
                          f"run.root ({cfg.run.root}): a relative path without '..'")
    if not 0 <= cfg.data.fold < cfg.data.n_folds:
        raise ConfigError(f"bad value for 'data.fold': {cfg.data.fold}; it must lie in "
                          f"[0, data.n_folds={cfg.data.n_folds})")
    if cfg.evaluate.age_calibration_subjects == "encoder-folds" and cfg.data.n_folds != 1:
        raise ConfigError(f"bad value for 'data.n_folds': {cfg.data.n_folds} with "
                          f"evaluate.age_calibration_subjects=encoder-folds; that calibration "
                          f"trains its own folds (evaluate.age_calibration_folds) around a model "
                          f"of every subject: set data.n_folds=1")
    if cfg.method == "lsor" and cfg.lsor.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"bad value for 'lsor.warmup_epochs': {cfg.lsor.warmup_epochs} warm-up "
                          f"epochs of train.epochs={cfg.train.epochs}; the SOM phase needs "
                          f"warmup_epochs ≤ epochs")
    if not cfg.evaluate.age_interval_level < 1:
        raise ConfigError(f"bad value for 'evaluate.age_interval_level': "
                          f"{cfg.evaluate.age_interval_level}; a prediction interval's level "
                          f"lies strictly between 0 and 1 (e.g. 0.9)")
    if cfg.lsor.tau_min > cfg.lsor.tau_max:
        raise ConfigError(f"bad value for 'lsor.tau_min': {cfg.lsor.tau_min} > lsor.tau_max="
                          f"{cfg.lsor.tau_max}; the neighbourhood shrinks from τmax to τmin")


def check_global_batch(cfg: DictConfig, world: int) -> int:
    """train.batch_size is the global batch of one optimizer step: it must split evenly over
    `world` ranks × engine.grad_accum_steps micro-batches. Returns the per-rank micro-batch.
    (The launcher checks it against the planned tasks, the trainer against the real world.)"""
    return micro_batch(int(cfg.train.batch_size), int(cfg.engine.grad_accum_steps), world)


def micro_batch(batch: int, accum: int, world: int) -> int:
    """The per-rank micro-batch of a global `batch` over `world` ranks × `accum` accumulation
    steps; ConfigError naming train.batch_size when it does not split evenly."""
    if batch % (world * accum):
        fit = max(world * accum, batch // (world * accum) * world * accum)
        raise ConfigError(f"bad value for 'train.batch_size': {batch} is the global batch and must "
                          f"be divisible by the {world} ranks × engine.grad_accum_steps {accum}: "
                          f"e.g. train.batch_size={fit}")
    return batch // (world * accum)
