"""Shared test fixtures: tiny cohort stores built with the store's own writers.

    def test_something(tmp_path, make_store):
        path = make_store(tmp_path, subjects=3, visits=[3, 2, 1], size=8)
        store = CohortStore(path)

Scans are laid out subject by subject, visits in order. Defaults (all overridable):
- subject "sub-001" …, session "ses-01" …; age = 60 + 3·s + 1.5·visit (exact in float32);
- sex alternating F/M by subject; group cycling NC, sMCI, pMCI, AD by subject; diagnosis per
  scan (CN; MCI; MCI then AD at a pMCI subject's last visit; AD); adas_cog float32 by group
  rising with visit;
- images: seeded standard normal (N, S, S, S) stored as `dtype` (float16 by default);
- affine: identity; source_path: a BIDS-like path.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

GROUPS = ("NC", "sMCI", "pMCI", "AD")
_ADAS_BASE = {"NC": 6.0, "sMCI": 11.0, "pMCI": 12.0, "AD": 19.0}
_ADAS_SLOPE = {"NC": 0.5, "sMCI": 1.0, "pMCI": 3.0, "AD": 4.0}


def build_cohort_store(root: str | Path, *, name: str = "cohort.zarr",
                       subjects: int | Sequence[str] = 3,
                       visits: int | Sequence[int] = 2,
                       size: int | Sequence[int] = 8,
                       ages: Sequence[float] | None = None,
                       images: np.ndarray | None = None,
                       columns: Mapping[str, Sequence] | None = None,
                       seed: int = 0, dtype: str = "float16",
                       scans_per_shard: int = 4, codec: str = "blosc-lz4") -> Path:
    """Write a tiny schema-v1 cohort store at root/name and return its path."""
    import zarr

    from hpcbrain.data import store as cohort

    labels = ([f"sub-{k + 1:03d}" for k in range(subjects)] if isinstance(subjects, int)
              else [str(s) for s in subjects])
    n_visits = [visits] * len(labels) if isinstance(visits, int) else [int(v) for v in visits]
    if len(n_visits) != len(labels):
        raise ValueError(f"visits: {len(n_visits)} counts for {len(labels)} subjects")
    shape = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)

    rows = [(s, label, v) for s, (label, n) in enumerate(zip(labels, n_visits))
            for v in range(n)]
    n_scans = len(rows)
    group_of = [GROUPS[s % len(GROUPS)] for s, _, _ in rows]
    last_visit = [v == n_visits[s] - 1 for s, _, v in rows]
    diagnosis = [{"NC": "CN", "sMCI": "MCI", "AD": "AD"}.get(g, "AD" if last and v > 0 else "MCI")
                 for g, last, (_, _, v) in zip(group_of, last_visit, rows)]
    data = {
        "subject": np.array([label for _, label, _ in rows], dtype=object),
        "session": np.array([f"ses-{v + 1:02d}" for _, _, v in rows], dtype=object),
        "age": np.array([60.0 + 3.0 * s + 1.5 * v for s, _, v in rows], dtype=np.float32),
        "sex": np.array(["F" if s % 2 == 0 else "M" for s, _, _ in rows], dtype=object),
        "group": np.array(group_of, dtype=object),
        "diagnosis": np.array(diagnosis, dtype=object),
        "adas_cog": np.array([_ADAS_BASE[g] + _ADAS_SLOPE[g] * v
                              for g, (_, _, v) in zip(group_of, rows)], dtype=np.float32),
        "source_path": np.array([f"{label}/ses-{v + 1:02d}/anat/{label}_ses-{v + 1:02d}_T1w.nii.gz"
                                 for _, label, v in rows], dtype=object),
        "affine": np.tile(np.eye(4), (n_scans, 1, 1)),
    }
    if ages is not None:
        data["age"] = np.asarray(ages, dtype=np.float32)
    for key, values in (columns or {}).items():
        values = np.asarray(values)
        data[key] = values.astype(object) if values.dtype.kind in "US" else values
    for key, values in data.items():
        if len(values) != n_scans:
            raise ValueError(f"column {key!r}: {len(values)} values for {n_scans} scans")

    if images is None:
        rng = np.random.default_rng(seed)
        images = rng.standard_normal((n_scans, *shape), dtype=np.float32)
    images = np.asarray(images)
    if images.shape != (n_scans, *shape):
        raise ValueError(f"images: shape {images.shape}, expected {(n_scans, *shape)}")

    path = Path(root) / name
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    layout = cohort.ImageLayout(shape=shape, dtype=dtype, scans_per_shard=scans_per_shard,
                                codec=codec)
    array = cohort.create_images_array(group, n_scans, layout)
    array[...] = images.astype(dtype)
    cohort.write_columns(group, data)
    group.attrs[cohort.ATTRS_KEY] = {
        "schema_version": cohort.SCHEMA_VERSION,
        "shape": list(shape),
        "spacing_mm": [1.0, 1.0, 1.0],
        "dtype": dtype,
        "n_scans": n_scans,
        "columns": sorted(k for k in data if k != "affine"),
        "preprocessing": {"source": "tests/conftest.py synthetic"},
        "skipped": [],
        "created_by": "tests/conftest.py",
    }
    return path


def build_age_contrast_store(root: str | Path, *, subjects: int = 8, visits: int = 3,
                             size: int = 16) -> Path:
    """A tiny store whose image contrast grows with age (the default conftest ages), so a
    trained encoder's latents spread with age instead of collapsing as pure noise does."""
    ages = np.array([60.0 + 3.0 * s + 1.5 * v for s in range(subjects) for v in range(visits)])
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal((size,) * 3)
    images = ((ages[:, None, None, None] - 70.0) / 5.0 * pattern
              + 0.2 * rng.standard_normal((len(ages),) + (size,) * 3))
    return build_cohort_store(root, subjects=subjects, visits=visits, size=size,
                              images=images.astype(np.float32), scans_per_shard=6)


@pytest.fixture(scope="session", autouse=True)
def host_cache(tmp_path_factory):
    """Per-host measurements (a CPU's peak FLOP/s) go to a test folder, not ~/.cache."""
    import os

    os.environ["HPCBRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("hpcbrain-cache"))


@pytest.fixture
def age_contrast_store(tmp_path) -> Path:
    return build_age_contrast_store(tmp_path)


@pytest.fixture
def make_store():
    """Factory fixture: `make_store(root, **kwargs) -> Path`; see `build_cohort_store`."""
    return build_cohort_store


def tiny_config(*files: str, **overrides):
    """A config through the real loader (schema, files, overrides): `tiny_config("lsor.yaml",
    **{"lsor.grid_rows": 2})`. The one factory tests use, so every test config is valid."""
    from hpcbrain.config import load_config

    return load_config(list(files), [f"{key}={value}" for key, value in overrides.items()])


def lsor_run_config(store, run_root, name, *extra: str):
    """A tiny LSOR training run on `store` (16³, 2×2 grid, 1 warm-up + 3 SOM epochs, batch 4,
    fp32, deterministic, no tracking) in run_root/name; `extra` overrides last."""
    return tiny_config("lsor.yaml", **{
        "data.store": store, "data.input_size": 16, "data.n_folds": 1, "data.val_fraction": 0.2,
        "data.num_workers": 0, "model.widths": "[4,4,4,4]", "train.epochs": 4,
        "train.batch_size": 4, "train.deterministic": "true", "train.precision": "fp32",
        "train.log_every_steps": 1, "lsor.warmup_epochs": 1, "lsor.grid_rows": 2,
        "lsor.grid_cols": 2, "run.root": run_root, "run.name": name,
        "tracking.enabled": "false", **dict(item.split("=", 1) for item in extra)})


TINY_LSOR = {"data.input_size": 16, "model.widths": "[4,8]", "train.epochs": 4, "train.seed": 0,
             "lsor.grid_rows": 2, "lsor.grid_cols": 3, "lsor.warmup_epochs": 2}


def _rank_entry(rank: int, worker, port: int, out_dir: str, world: int, args: tuple) -> None:
    """A spawned rank: torchrun's variables, one thread, the worker, its result saved."""
    import os

    import torch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    torch.save(worker(rank, *args), Path(out_dir) / f"rank{rank}.pt")


def run_on_ranks(worker, out_dir: str | Path, *args, world: int = 2) -> list:
    """Run `worker(rank, *args)` in `world` spawned processes that find torchrun's variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free loopback port) in their
    environment, and return what each rank's worker returned, in rank order. The worker sets
    up (and ends) its own process group; it must be a module-level function."""
    import torch
    import torch.multiprocessing as mp

    from hpcbrain.process_group import free_port

    out_dir = Path(out_dir)
    mp.spawn(_rank_entry, args=(worker, free_port(), str(out_dir), world, args), nprocs=world,
             join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def start_rank_group() -> None:
    """In a `run_on_ranks` worker: the gloo process group its environment describes (through
    hpcbrain's own set-up, as a launched job gets it)."""
    from hpcbrain import process_group

    process_group.setup_distributed(backend="gloo")


def end_rank_group() -> None:
    """In a `run_on_ranks` worker, last: every rank done talking before any tears its gloo pairs
    down (a rank that left first made the other abort now and then: "terminate called without
    an active exception", 1 run in 6), then the group ended."""
    import torch.distributed as dist

    from hpcbrain import process_group

    dist.barrier()
    process_group.teardown()


@pytest.fixture
def without_antspy(monkeypatch):
    """`import ants` fails, as on a machine without ANTsPy (the register extra)."""
    import builtins

    real_import = builtins.__import__

    def no_ants(name, *args, **kwargs):
        if name == "ants":
            raise ImportError("No module named 'ants'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ants)
