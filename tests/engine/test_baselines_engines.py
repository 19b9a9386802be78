"""LSOR's baselines on every engine: one process through single, DDP and DeepSpeed ZeRO 0 and 3
ends with the same parameters (LSSL: a parameter outside the autoencoder; LNE: the neighbourhood
through the global-batch gather)."""
from __future__ import annotations

import pytest
from conftest import lsor_run_config, run_on_ranks
from test_engines import assert_states_close, instrument_trainer

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ENGINES = {"single": ["engine.name=single"], "ddp": ["engine.name=ddp"],
           "deepspeed-zero0": ["engine.name=deepspeed", "engine.zero_stage=0"],
           "deepspeed-zero3": ["engine.name=deepspeed", "engine.zero_stage=3"]}
METHODS = ("lssl", "lne")


def _worker(_, store: str, root: str) -> dict:
    from hpcbrain.job import run_training

    results = {}
    for method in METHODS:
        for engine, overrides in ENGINES.items():
            record: dict = {}
            instrument_trainer(record, kill_at_epoch=None)
            run_training(lsor_run_config(
                store, root, f"{method}-{engine}", f"method={method}", "train.epochs=2",
                "train.max_steps_per_epoch=2", "train.num_threads=1",
                "train.channels_last=false", "baselines.lne_neighbours=2", *overrides))
            results[(method, engine)] = record["final"]
    return results


def test_every_engine_trains_the_baselines_alike(tmp_path, age_contrast_store):
    [results] = run_on_ranks(_worker, tmp_path, str(age_contrast_store), str(tmp_path / "runs"),
                             world=1)
    for method in METHODS:
        reference = results[(method, "single")]
        for engine in ENGINES:
            assert_states_close(results[(method, engine)], reference, atol=2e-5, rtol=1e-4,
                                what=f"{method} {engine}")
