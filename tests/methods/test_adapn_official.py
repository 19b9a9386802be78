"""The official-code variants (configs/adapn-official.yaml, configs/rnc-official.yaml, NNCLR's
queue) against the official formulas, written out here from the published code's algebra.

Hand case as in test_adapn_losses.py (temperature 1): z0 = (1, 0), z1 = (0.6, 0.8), z2 = (0, 1),
z3 = (−0.8, 0.6), y = (0, 1, 1, 2), w(Δ) = 2^(−Δ²). All off-diagonal weights:
    Σ_{i,k≠i} w_ik = 2·(½ + ½ + 1/16 + 1 + ½ + ½) = 6.125;  per anchor Σ_k w_ik = 17/16, 2, 2, 17/16
    Σ_k w_ik s_ik = 0.25, 1.1, 1.1, 0.25
Y-Aware denominators D_i = log Σ_{t≠i} e^{s_it}: D0 = D3 = log(e^0.6 + 1 + e^−0.8),
D1 = D2 = log(e^0.6 + e^0.8 + 1). With the global normalisation
    L = −[2·(0.25 − 17/16·D0) + 2·(1.1 − 2·D1)] / 6.125.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpcbrain.config import load_config
from hpcbrain.methods import build_method
from hpcbrain.methods.contrastive_losses import (
    adapn_loss,
    exponential_loss,
    nnclr_loss,
    rnc_loss,
    threshold_loss,
    yaware_loss,
)

E, LOG = math.exp, math.log
SIGMA = (2 * math.log(2)) ** -0.5


def hand_case():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6]], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    return z, y


def test_global_weight_normalisation_hand_case():
    z, y = hand_case()
    d0, d1 = LOG(E(0.6) + 1 + E(-0.8)), LOG(E(0.6) + E(0.8) + 1)
    expected = -(2 * (0.25 - 17 / 16 * d0) + 2 * (1.1 - 2 * d1)) / 6.125
    got = yaware_loss(z, y, sigma=SIGMA, temperature=1.0, weight_norm="global")
    assert float(got) == pytest.approx(expected, abs=1e-12)
    # per anchor (Eq. 2) differs: anchors with more same-age samples no longer weigh more
    per_anchor = yaware_loss(z, y, sigma=SIGMA, temperature=1.0)
    assert abs(float(per_anchor) - expected) > 1e-3


def test_global_weight_normalisation_adds_up_over_anchor_subsets():
    # what a rank computes for its own anchors, summed over ranks, is the one-process loss
    torch.manual_seed(0)
    z = F.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
    y = torch.linspace(40, 85, 10, dtype=torch.float64)
    for loss in (lambda **kw: adapn_loss(z, y, 5, sigma=3.0, temperature=0.2, **kw),
                 lambda **kw: exponential_loss(z, y, sigma=3.0, temperature=0.2, **kw),
                 lambda **kw: threshold_loss(z, y, sigma=3.0, temperature=0.2, **kw),
                 lambda **kw: yaware_loss(z, y, sigma=3.0, temperature=0.2, **kw)):
        whole = loss(weight_norm="global")
        parts = sum(loss(weight_norm="global", anchors=torch.arange(a, b), reduction="sum")
                    for a, b in ((0, 3), (3, 10)))
        torch.testing.assert_close(parts / 10, whole)


def algorithm1(epoch: int, max_epochs: int, start: int, end: int, step: int) -> int:
    """The official calculate_dynamic_NN_nb, as written in its util.py."""
    completed, total = epoch // step, max_epochs // step
    return max(int(start - (start - end) / float(total - 1) * completed), end)


def official_dynlocrep(z, y, *, epoch, max_epochs, nn_step, nn_final, tau, base_tau, sigma,
                       selection):
    """The official DynLocRep_loss(method='expw') forward on z [2B, d] (all first views, then
    all second views; the official features.unbind(1) order), y [B], `epoch` counted from 1."""
    n, b = z.shape[0], z.shape[0] // 2
    labels = torch.cat([y, y])
    w = torch.exp(-(labels[:, None] - labels[None]) ** 2 / (2 * sigma ** 2))
    off = 1.0 - torch.eye(n, dtype=z.dtype)
    s = z @ z.T / tau
    logits = s - s.max(dim=1, keepdim=True).values.detach()
    if nn_step > 0 and b >= 32:
        nn = algorithm1(epoch, max_epochs, b, nn_final, nn_step)
        score = logits if selection == "similarity" else 1.0 / torch.cdist(z, z, p=1)
        top = torch.topk(score, 2 * nn, dim=1).indices             # the anchor included
        neighbour = torch.zeros_like(logits).scatter_(1, top, 1.0)
    else:
        neighbour = torch.ones_like(logits)
    den = (torch.exp(logits * (1 - w)) * neighbour * off).sum(1, keepdim=True)
    log_prob = logits - torch.log(den)
    loss = -(w * off * log_prob).sum() / (w * off).sum()
    return tau / base_tau * loss


def official_method(batch_scans: int, **overrides):
    cfg = load_config(["adapn.yaml", "adapn-official.yaml"],
                      ["model.backbone=lsor", "model.widths=[2,2]", "data.input_size=8",
                       "train.epochs=10", f"train.batch_size={batch_scans}",
                       *[f"{k}={v}" for k, v in overrides.items()]])
    return build_method(cfg)


@pytest.mark.parametrize("scans, epoch, distance", [(32, 0, "similarity"), (32, 3, "similarity"),
                                                    (32, 3, "manhattan"), (16, 3, "similarity")])
def test_official_config_reproduces_the_official_loss_and_gradient(scans, epoch, distance):
    # 32 scans: the neighbourhood shrinks from the first (1-based) epoch; 16: gated off
    method = official_method(scans, **{"contrastive.distance": distance})
    method.epoch = epoch
    torch.manual_seed(epoch + scans)
    z0 = F.normalize(torch.randn(2 * scans, 6, dtype=torch.float64), dim=1)
    y = torch.rand(scans, dtype=torch.float64) * 40 + 50
    ids = torch.arange(scans, dtype=torch.float64)
    labels = torch.stack([torch.cat([y, y]), torch.cat([ids, ids])], 1)
    ours_z = z0.clone().requires_grad_()
    ours = method.loss_scale * method._loss_sum(ours_z, labels, torch.arange(2 * scans)) / (2 * scans)
    ours.backward()
    ref_z = z0.clone().requires_grad_()
    ref = official_dynlocrep(ref_z, y, epoch=epoch + 1, max_epochs=10, nn_step=1, nn_final=14,
                             tau=0.1, base_tau=0.07, sigma=2.0,
                             selection="similarity" if distance == "similarity" else "manhattan")
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_z.grad, ref_z.grad)
    expected_nn = scans if scans < 32 else algorithm1(epoch + 1, 10, scans, 14, 1)
    assert method.nn_nb_at(epoch, scans) == expected_nn


def test_paper_defaults_count_epochs_from_zero_and_never_gate():
    cfg = load_config(["adapn.yaml"], ["model.backbone=lsor", "model.widths=[2,2]",
                                       "data.input_size=8", "train.epochs=10"])
    method = build_method(cfg)
    assert method.nn_nb_at(0, 16) == 16                   # Algorithm 1 from epoch 0
    assert method.nn_nb_at(1, 16) == algorithm1(1, 10, 16, 14, 1) == 15   # no gate below 32
    official = official_method(16)
    assert official.nn_nb_at(1, 16) == 16 and official.nn_nb_at(1, 40) == algorithm1(2, 10, 40, 14, 1)


def test_similarity_selection_picks_the_highest_dot_products():
    z, y = hand_case()
    # dots from z0: 0.6 (z1), 0 (z2), −0.8 (z3): one neighbour = z1, two = z1, z2
    got = adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0, distance="similarity", reduction="none")
    want = adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0, distance="cosine", reduction="none")
    torch.testing.assert_close(got, want)     # unit vectors: the same order as cosine


def official_rnc(features, y, tau):
    """The official RnCLoss forward (features [2B, d], first views then second, y [B])."""
    n = features.shape[0]
    labels = torch.cat([y, y])
    diffs = (labels[:, None] - labels[None]).abs()
    logits = -(features[:, None] - features[None]).norm(dim=-1) / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    keep = ~torch.eye(n, dtype=torch.bool)
    logits, exp_logits = logits[keep].view(n, n - 1), logits.exp()[keep].view(n, n - 1)
    diffs = diffs[keep].view(n, n - 1)
    loss = 0.0
    for k in range(n - 1):
        negatives = (diffs >= diffs[:, k:k + 1]).to(logits.dtype)
        loss = loss - ((logits[:, k] - torch.log((negatives * exp_logits).sum(-1)))
                       / (n * (n - 1))).sum()
    return loss


def test_rnc_official_similarity_matches_the_official_loss_and_gradient():
    torch.manual_seed(5)
    f0 = torch.randn(12, 5, dtype=torch.float64) * 3           # un-normalised features
    y = torch.tensor([30, 41, 41, 50, 62, 70], dtype=torch.float64)  # a tie on purpose
    a, b = f0.clone().requires_grad_(), f0.clone().requires_grad_()
    ours = rnc_loss(a, torch.cat([y, y]), temperature=2.0, similarity="neg_l2")
    ref = official_rnc(b, y, 2.0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.isfinite(a.grad).all()


def test_rnc_official_config_takes_the_backbone_features():
    cfg = load_config(["rnc.yaml", "rnc-official.yaml"],
                      ["model.backbone=lsor", "model.widths=[2,2]", "data.input_size=8"])
    method = build_method(cfg)
    torch.manual_seed(0)
    x, age, index = torch.randn(4, 1, 8, 8, 8), torch.tensor([50.0, 60, 70, 80]), torch.arange(4)
    got = method({"x": x, "age": age, "index": index})["loss"]
    with torch.no_grad():
        features = method.backbone(method.make_views(x, index)).double()
    want = rnc_loss(features, torch.cat([age, age]).double(), temperature=2.0,
                    similarity="neg_l2")
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    # the head gets no gradient: DDP is told so, and evaluation reads the trained features
    got.backward()
    assert all(p.grad is None for p in method.head.parameters())
    assert method.find_unused_parameters and method.encoder().mode == "backbone"


def test_nnclr_never_takes_the_anchors_own_scan_from_the_queue():
    # support: a stale copy of scan 0 (id 0, identical to z1_0) and scan 7 (0.6, 0.8)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.6, 0.8], [-0.8, 0.6]], dtype=torch.float64)
    support = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    support_ids, ids = torch.tensor([0, 7]), torch.tensor([0, 1])
    got = nnclr_loss(z1, z2, support, temperature=1.0, support_ids=support_ids, ids=ids,
                     reduction="none")
    # anchor 0 (view 1): its own copy is skipped → q = (0.6, 0.8); logits q·z2ᵀ = (1, 0)
    # anchor 0 (view 2, (0.6,0.8)): the nearest non-own is (0.6, 0.8) itself (id 7);
    #   logits vs z1 = (0.6, 0.8)
    # anchor 1 (view 1, (0,1)): dots (0, 0.8) → (0.6,0.8); logits vs z2 = (1, 0) → target 1
    # anchor 1 (view 2, (−0.8,0.6)): dots (−0.8, 0) → (0.6, 0.8); logits vs z1 = (0.6, 0.8)
    l0 = 0.5 * (LOG(1 + E(-1)) + LOG(1 + E(0.2)))
    l1 = 0.5 * (LOG(1 + E(1)) + LOG(1 + E(-0.2)))
    torch.testing.assert_close(got, torch.tensor([l0, l1], dtype=torch.float64))
    without = nnclr_loss(z1, z2, support, temperature=1.0, reduction="none")
    assert float(without[0]) != pytest.approx(l0)     # the stale copy would have been chosen


def test_nnclr_queue_is_capped_at_the_training_set(tmp_path):
    from hpcbrain.methods import get_method_class

    cfg = load_config(["nnclr.yaml"], ["model.backbone=lsor", "model.widths=[2,2]",
                                       "data.input_size=8"])
    assert cfg.contrastive.nnclr_queue == 1024
    from hpcbrain.methods.base import TrainingSetSize

    get_method_class("nnclr").resolve_config(cfg.contrastive, TrainingSetSize(114, 114, 40))
    assert cfg.contrastive.nnclr_queue == 114
    assert build_method(cfg).queue.shape[0] == 114
    get_method_class("adapn").resolve_config(cfg.contrastive,           # other methods change
                                             TrainingSetSize(10, 10, 4))  # nothing
    assert cfg.contrastive.nnclr_queue == 114
