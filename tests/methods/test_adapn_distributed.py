"""The contrastive losses across 2 gloo processes with DIFFERENT (and unequally many) samples per
rank equal one process on the concatenated batch: loss value and gradients.

* embeddings: every loss of the family through `global_batch_loss` (all_gather_with_grad of z,
  plain gather of labels, own anchors against the global batch); the mean over ranks of the
  returned values is the single-process loss, and z.grad / world is the single-process gradient
  (the gather's backward sums every rank's contribution into the slice's owner);
* a tiny linear encoder wrapped in DDP: DDP's gradient average equals the single-process
  gradient of AdapN (neighbour sets crossing ranks);
* the AdapN method itself (ResNet at 8³, two cutout views per scan, the NN_nb schedule on the
  global batch) under DDP, BatchNorm in eval mode so that only the loss's distribution matters;
  the supervised upper bound (same backbone, MSE on age) the same way.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import end_rank_group, run_on_ranks, start_rank_group, tiny_config

from hpcbrain.methods import contrastive_losses as L

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORLD = 2
SPLIT = [(0, 3), (3, 7)]          # 3 samples on rank 0, 4 on rank 1
SCAN_SPLIT = [(0, 2), (2, 5)]     # method test: 2 scans on rank 0, 3 on rank 1
SIGMA, TAU = 12.0, 0.3


def data():
    g = torch.Generator().manual_seed(11)
    z = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    support = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([23.0, 71.0, 35.0, 50.0, 29.0, 64.0, 41.0], dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 3], dtype=torch.float64)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    return z, z2, support, y, ids, x


def loss_sums(z2_all, support):
    """name → loss_sum(z_all, labels_all [N, 2] = (age, id), anchors)."""
    common = dict(temperature=TAU, reduction="sum")
    return {
        "adapn_nn2": lambda z, lab, a: L.adapn_loss(z, lab[:, 0], 2, sigma=SIGMA, anchors=a, **common),
        "adapn_nn4_far": lambda z, lab, a: L.adapn_loss(z, lab[:, 0], 4, sigma=SIGMA, far_lambda=1.0,
                                                        distance="chebyshev", anchors=a, **common),
        "exponential": lambda z, lab, a: L.exponential_loss(z, lab[:, 0], sigma=SIGMA, anchors=a, **common),
        "yaware": lambda z, lab, a: L.yaware_loss(z, lab[:, 0], sigma=SIGMA, anchors=a, **common),
        "threshold": lambda z, lab, a: L.threshold_loss(z, lab[:, 0], sigma=SIGMA, anchors=a, **common),
        "rnc": lambda z, lab, a: L.rnc_loss(z, lab[:, 0], anchors=a, **common),
        "simclr": lambda z, lab, a: L.simclr_loss(z, lab[:, 1], anchors=a, **common),
        "nnclr": lambda z, lab, a: L.nnclr_loss(z[:, :4], z[:, 4:], support, anchors=a, **common),
        # the official-code variants (configs/adapn-official.yaml, rnc-official.yaml, NNCLR ids)
        "adapn_official": lambda z, lab, a: L.adapn_loss(
            z, lab[:, 0], 3, sigma=SIGMA, max_shift=True, weight_norm="global",
            distance="similarity", anchors=a, **common),
        "yaware_global": lambda z, lab, a: L.yaware_loss(z, lab[:, 0], sigma=SIGMA,
                                                         weight_norm="global", anchors=a, **common),
        "rnc_neg_l2": lambda z, lab, a: L.rnc_loss(z, lab[:, 0], similarity="neg_l2", anchors=a,
                                                   **common),
        "nnclr_exclude_self": lambda z, lab, a: L.nnclr_loss(
            z[:, :4], z[:, 4:], support, support_ids=torch.tensor([0, 1, 2, 3, 9]),
            ids=lab[:, 1].long(), anchors=a, **common),
    }


def tiny_method_cfg():
    return tiny_config("adapn.yaml", **{
        "data.input_size": 8, "model.resnet_width": 2, "model.projection_dim": 8,
        "train.epochs": 3, "contrastive.nn_final": 2, "contrastive.nn_step": 1,
        "contrastive.augment.p": 1.0, "contrastive.augment.cutout_size": 3})


def method_batch():
    g = torch.Generator().manual_seed(5)
    return {"x": torch.randn(5, 1, 8, 8, 8, generator=g),
            "age": torch.tensor([30.0, 62.0, 45.0, 51.0, 38.0]),
            "index": torch.tensor([10, 11, 12, 13, 14])}


def build_method(name: str = "adapn"):
    from hpcbrain.methods import build_method as build

    torch.manual_seed(0)
    cfg = tiny_method_cfg()
    cfg.method = name                    # supervised: the same backbone, an MSE head
    method = build(cfg)
    method.eval()                        # BatchNorm on running statistics: rank-independent
    method.set_progress(1, 0, 1)         # epoch 1: NN_nb = int(5 − 3/2) = 3 scans → 5 samples
    return method


def _worker(rank: int) -> dict:
    start_rank_group()
    try:
        from torch.nn.parallel import DistributedDataParallel

        from hpcbrain.methods.contrastive import global_batch_loss

        z, z2, support, y, ids, x = data()
        lo, hi = SPLIT[rank]
        out = {}
        labels = torch.stack([y, ids], 1)[lo:hi]
        for name, fn in loss_sums(z2, support).items():
            emb = (torch.cat([z, z2], 1) if name.startswith("nnclr") else z)[lo:hi].clone().requires_grad_()
            loss = global_batch_loss(fn, emb, labels)
            loss.backward()
            out[name] = (loss.detach(), emb.grad)

        torch.manual_seed(3)
        linear = torch.nn.Linear(6, 4).double()
        ddp = DistributedDataParallel(linear)
        zl = F.normalize(ddp(x[lo:hi]), dim=1)
        loss = global_batch_loss(loss_sums(z2, support)["adapn_nn2"], zl, labels)
        loss.backward()
        out["ddp_linear"] = (loss.detach(), [p.grad.clone() for p in linear.parameters()])

        method = build_method()
        ddp = DistributedDataParallel(method)
        a, b = SCAN_SPLIT[rank]
        batch = {k: v[a:b] for k, v in method_batch().items()}
        loss = ddp(batch)["loss"]
        loss.backward()
        out["ddp_method"] = (loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters()},
                             method.scalars()["nn_nb"])

        supervised = build_method("supervised")
        ddp = DistributedDataParallel(supervised)
        loss = ddp(batch)["loss"]
        loss.backward()
        out["ddp_supervised"] = (loss.detach(),
                                 {n: p.grad.clone() for n, p in supervised.named_parameters()})
        return out
    finally:
        end_rank_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_ranks(_worker, tmp_path_factory.mktemp("adapn-dist"), world=WORLD)


def test_every_loss_equals_single_process_on_the_concatenated_batch(ranks):
    z, z2, support, y, ids, _ = data()
    labels = torch.stack([y, ids], 1)
    for name, fn in loss_sums(z2, support).items():
        emb = (torch.cat([z, z2], 1) if name.startswith("nnclr") else z).clone().requires_grad_()
        n = emb.shape[0]
        single = fn(emb, labels, torch.arange(n)) / n
        single.backward()
        values = torch.stack([ranks[r][name][0] for r in range(WORLD)])
        # the mean over ranks of the returned values is the global mean loss
        torch.testing.assert_close(values.mean(), single.detach(), msg=name)
        grads = torch.cat([ranks[r][name][1] for r in range(WORLD)])
        # each rank holds world × its slice of ∂L/∂z (DDP's average divides by world)
        torch.testing.assert_close(grads / WORLD, emb.grad, msg=name)


def test_ddp_linear_encoder_gradients_equal_single_process(ranks):
    z, z2, support, y, ids, x = data()
    torch.manual_seed(3)
    linear = torch.nn.Linear(6, 4).double()
    zl = F.normalize(linear(x), dim=1)
    single = L.adapn_loss(zl, y, 2, sigma=SIGMA, temperature=TAU)
    single.backward()
    torch.testing.assert_close(torch.stack([r["ddp_linear"][0] for r in ranks]).mean(),
                               single.detach())
    for rank in ranks:   # DDP leaves the same averaged gradient on every rank
        for got, want in zip(rank["ddp_linear"][1], linear.parameters()):
            torch.testing.assert_close(got, want.grad)


def test_ddp_adapn_method_equals_single_process(ranks):
    method = build_method()
    loss = method(method_batch())["loss"]
    loss.backward()
    assert method.scalars()["nn_nb"] == 3 == ranks[0]["ddp_method"][2] == ranks[1]["ddp_method"][2]
    torch.testing.assert_close(torch.stack([r["ddp_method"][0] for r in ranks]).mean(),
                               loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in method.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["ddp_method"][1][name], p.grad, rtol=1e-4,
                                       atol=1e-6, msg=name)


def test_ddp_supervised_method_equals_single_process(ranks):
    from hpcbrain.methods.contrastive import view_generator

    method = build_method("supervised")
    batch = method_batch()
    loss = method(batch)["loss"]
    loss.backward()
    # the MSE of one process on all 5 scans (same cutout view as each rank draws)
    with torch.no_grad():
        views = torch.stack([method.view_transform(x, view_generator(method.seed, method.epoch, int(i)))
                             for x, i in zip(batch["x"], batch["index"])])
        expected = ((method.predict_age(views) - batch["age"]) / 10.0).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([r["ddp_supervised"][0] for r in ranks]).mean(),
                               loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in method.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["ddp_supervised"][1][name], p.grad, rtol=1e-4,
                                       atol=1e-6, msg=name)
