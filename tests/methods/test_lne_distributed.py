"""LNE's neighbourhoods span the global batch: under DDP on 2 gloo processes (3 pairs each) the
loss and every parameter gradient equal one process on all 6 pairs. Each pair takes 3
neighbours and a rank holds only 2 other pairs, so every neighbourhood reaches across ranks."""
from __future__ import annotations

import pytest
import torch
from conftest import end_rank_group, run_on_ranks, start_rank_group, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORLD = 2


def build():
    from hpcbrain.methods import build_method

    torch.manual_seed(0)
    method = build_method(tiny_config("lne.yaml", **{
        "data.input_size": 8, "model.widths": "[4,4]", "baselines.lne_neighbours": 3,
        "baselines.lne_sigma2": 5.0}))
    method.eval()                    # BatchNorm on running statistics: rank-independent
    return method


def batch():
    g = torch.Generator().manual_seed(4)
    return {"x_u": torch.randn(6, 1, 8, 8, 8, generator=g),
            "x_v": torch.randn(6, 1, 8, 8, 8, generator=g),
            "dt": 0.5 + torch.rand(6, generator=g)}


def _worker(rank: int) -> dict:
    start_rank_group()
    try:
        from torch.nn.parallel import DistributedDataParallel

        method = build()
        ddp = DistributedDataParallel(method)
        mine = {k: v[3 * rank:3 * rank + 3] for k, v in batch().items()}
        losses = ddp(mine)
        losses["loss"].backward()
        return {"loss": losses["loss"].detach(), "dir": losses["dir"].detach(),
                "grads": {n: p.grad.clone() for n, p in method.named_parameters()}}
    finally:
        end_rank_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(_worker, tmp_path_factory.mktemp("lne-dist"), world=WORLD)


def test_ddp_lne_equals_single_process_on_the_whole_batch(ranks):
    method = build()
    losses = method(batch())
    losses["loss"].backward()
    for key in ("loss", "dir"):
        torch.testing.assert_close(torch.stack([r[key] for r in ranks]).mean(),
                                   losses[key].detach(), rtol=1e-5, atol=1e-6, msg=key)
    for name, p in method.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], p.grad, rtol=1e-4, atol=1e-6,
                                       msg=name)
