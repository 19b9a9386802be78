"""A rank that stops or hangs is noticed: the others fail fast, naming the collective, instead
of waiting for the start-up timeout (two gloo processes)."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import run_on_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _worker(rank: int, rank1_does: str) -> dict:
    from hpcbrain import dist, process_group

    process_group.setup_distributed(timeout_minutes=5)
    try:
        dist.all_reduce_sum(torch.ones(1))              # both ranks are up
        dist.set_timeout(0.05)                           # 3 s, as a step timeout would be
        if rank == 1:
            if rank1_does == "hang":
                time.sleep(15)                           # alive but never joins
            return {}                                    # "stop": leaves, closing its sockets
        started = time.perf_counter()
        try:
            dist.all_reduce_sum(torch.ones(1))
        except dist.CollectiveFailed as exc:
            return {"message": str(exc), "seconds": time.perf_counter() - started}
        return {"message": None}
    finally:
        process_group.teardown()


@pytest.mark.parametrize("rank1_does", ["hang", "stop"])
def test_the_surviving_rank_fails_fast_naming_the_collective(tmp_path, rank1_does):
    survivor = run_on_ranks(_worker, tmp_path, rank1_does, world=2)[0]
    assert survivor["message"] is not None, "rank 0 waited instead of failing"
    assert "all_reduce_sum" in survivor["message"] and "within 0.05 min" in survivor["message"]
    assert "another rank stopped, hung or is far behind" in survivor["message"]
    assert survivor["seconds"] < 10         # the step timeout (3 s), not the 5-minute start-up one
