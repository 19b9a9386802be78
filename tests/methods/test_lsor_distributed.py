"""LSOR under torch.distributed: 2 gloo processes with UNEQUAL per-rank batches.

* ema_update and centre_update: one all_reduce each → every rank equals a single process on
  the concatenated batch;
* SOM init: latents gathered to rank 0, k-means there, G/ΔG broadcast → identical on both ranks
  (and equal to a single process encoding the same batches: with `init_bn_mode=batch` a latent
  depends on its batch's statistics, so the single process sees the ranks' batches);
* SOM health: per-rank sums all-reduced once → every rank logs the single-process values.
"""

import pytest
import torch
from conftest import TINY_LSOR, end_rank_group, run_on_ranks, start_rank_group, tiny_config

from hpcbrain.methods.lsor import LSOR
from hpcbrain.methods.som import centre_update, ema_update

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORLD = 2
K, D = 5, 3
N_EMA = 7                       # rank 0: rows [0, 2), rank 1: rows [2, 7)
EMA_SPLIT = [(0, 2), (2, 7)]
PAIR_SPLIT = [(0, 3), (3, 9)]   # 3 pairs on rank 0, 6 on rank 1


def make_cfg():
    # centred nodes: the k-means init then also sets the latent centre on every rank
    return tiny_config("lsor.yaml", **TINY_LSOR, **{"lsor.centred_nodes": "true"})


def ema_data():
    g = torch.Generator().manual_seed(123)
    ref = torch.randn(K, D, generator=g)
    dz = torch.randn(N_EMA, D, generator=g)
    cluster = torch.tensor([0, 3, 3, 0, 1, 3, 0])  # cluster 2 and 4 have no member → keep ref
    return ref, dz, cluster


def pair_batches(lo, hi):
    # every pair of the global set, then the rank's slice re-batched by 2 (uneven batch counts)
    g = torch.Generator().manual_seed(7)
    flat = {"x_u": torch.randn(9, 1, 16, 16, 16, generator=g),
            "x_v": torch.randn(9, 1, 16, 16, 16, generator=g),
            "dt": 0.5 + 2 * torch.rand(9, generator=g),
            "index_u": torch.arange(9) * 2, "index_v": torch.arange(9) * 2 + 1}
    sl = {k: v[lo:hi] for k, v in flat.items()}
    return [{k: v[i:i + 2] for k, v in sl.items()} for i in range(0, hi - lo, 2)]


def _worker(rank: int) -> dict:
    start_rank_group()
    try:
        ref, dz, cluster = ema_data()
        lo, hi = EMA_SPLIT[rank]
        ema = ema_update(ref, dz[lo:hi], cluster[lo:hi], alpha=0.9)
        centre = centre_update(ref[0], dz[lo:hi], momentum=0.5)

        torch.manual_seed(0)
        model = LSOR.from_config(make_cfg())
        lo, hi = PAIR_SPLIT[rank]
        model.on_epoch_start(model.warmup_epochs, lambda: iter(pair_batches(lo, hi)))
        health = model.on_epoch_end(model.warmup_epochs, lambda: iter(pair_batches(lo, hi)))
        return {"ema": ema, "centre": centre, "latent_centre": model.latent_centre.clone(),
                "G": model.G.detach().clone(), "dG": model.dG.clone(),
                "init": bool(model.initialised.item()), "health": health}
    finally:
        end_rank_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_on_ranks(_worker, tmp_path_factory.mktemp("lsor_dist"), world=WORLD)


def test_ema_update_matches_single_process_on_every_rank(results):
    ref, dz, cluster = ema_data()
    single = ema_update(ref, dz, cluster, alpha=0.9)
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["ema"], single, rtol=0, atol=1e-6)
    # empty clusters kept their value
    torch.testing.assert_close(single[[2, 4]], ref[[2, 4]], rtol=0, atol=0)
    # the latent centre: 0.5·c + 0.5·mean of all 7 rows, although rank 0 holds 2 and rank 1 5
    expect = 0.5 * ref[0] + 0.5 * dz.mean(0)
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["centre"], expect, rtol=0, atol=1e-6)


def test_kmeans_init_identical_on_all_ranks_and_equal_to_single_process(results):
    assert all(r["init"] for r in results)
    assert torch.equal(results[0]["G"], results[1]["G"])
    assert torch.equal(results[0]["dG"], results[1]["dG"])
    assert torch.equal(results[0]["latent_centre"], results[1]["latent_centre"])
    assert torch.count_nonzero(results[0]["latent_centre"]) > 0
    single = _single_process()
    torch.testing.assert_close(results[0]["latent_centre"], single.latent_centre, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(results[0]["G"], single.G.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0]["dG"], single.dG, rtol=1e-4, atol=1e-5)


def _ranks_batches():
    return [b for lo, hi in PAIR_SPLIT for b in pair_batches(lo, hi)]


def _single_process():
    torch.manual_seed(0)
    single = LSOR.from_config(make_cfg())
    single.on_epoch_start(single.warmup_epochs, lambda: iter(_ranks_batches()))
    return single


def test_som_health_is_the_single_process_value_on_every_rank(results):
    single = _single_process()
    expected = single.on_epoch_end(single.warmup_epochs, lambda: iter(_ranks_batches()))
    assert {"som/train_occupied_nodes", "som/quantisation_error", "som/topographic_error",
            "som/latent_spread"} <= set(expected)
    for r in range(WORLD):
        assert results[r]["health"].keys() == expected.keys()
        for key, value in expected.items():
            assert results[r]["health"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
