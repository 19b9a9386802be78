"""Encoders, projection head and the contrastive Method on single batches (no trainer)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from hpcbrain.methods import available_methods, build_method
from hpcbrain.methods.contrastive import CONTRASTIVE_METHODS, view_generator
from hpcbrain.models.heads import FeatureExtractor, ProjectionHead
from hpcbrain.models.resnet3d import resnet18_3d


def tiny_cfg(method="adapn", *overrides):
    return tiny_config(f"{method}.yaml", **{"data.input_size": 16, "model.resnet_width": 2,
                                            "train.epochs": 4,
                                            **dict(o.split("=", 1) for o in overrides)})


def batch(b=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, 1, size, size, size, generator=g),
            "age": torch.tensor([25.0, 40.0, 58.0, 71.0, 33.0, 66.0][:b]),
            "index": torch.arange(b) + 100}


def test_resnet18_is_the_paper_size_and_takes_small_volumes():
    full = resnet18_3d()
    n_params = sum(p.numel() for p in full.parameters())
    assert full.feature_dim == 512
    assert 33.0e6 < n_params < 33.4e6          # the paper quotes 33.5 M with its head
    tiny = resnet18_3d(width=2)
    assert tiny.feature_dim == 16
    assert tiny(torch.randn(3, 1, 16, 16, 16)).shape == (3, 16)
    with pytest.raises(ValueError, match="volumes"):
        tiny(torch.randn(3, 16, 16, 16))


def test_projection_head_512_512_128_l2_normalised():
    head = ProjectionHead(512)
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 128)]
    z = head(torch.randn(5, 512))
    assert z.shape == (5, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("features, dim", [("projection", 128), ("backbone", 16)])
def test_feature_modes(features, dim):
    method = build_method(tiny_cfg("adapn", f"model.features={features}"))
    encoder = method.encoder()
    assert isinstance(encoder, FeatureExtractor) and encoder.mode == features
    encoder.eval()
    out = encoder(torch.randn(2, 1, 16, 16, 16))
    assert out.shape == (2, dim)
    if features == "projection":
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    # no copies: the extractor shares the method's parameters
    assert next(encoder.backbone.parameters()) is next(method.backbone.parameters())


def test_lsor_encoder_backbone():
    method = build_method(tiny_cfg("adapn", "model.backbone=lsor", "model.widths=[2,2]"))
    assert method.feature_dim == 2 * 4 ** 3            # widths[-1] · (16 / 2²)³
    assert method.head.in_dim == method.head.hidden_dim == 128
    out = method(batch())
    assert torch.isfinite(out["loss"])


def test_every_loss_is_registered_and_trains_one_step():
    assert set(CONTRASTIVE_METHODS) <= set(available_methods())
    for name in CONTRASTIVE_METHODS:
        torch.manual_seed(0)
        method = build_method(tiny_cfg(name, "contrastive.nnclr_queue=6"))
        method.train()
        loss = method(batch())["loss"]
        assert loss.ndim == 0 and torch.isfinite(loss), name
        loss.backward()
        assert all(p.grad is not None for p in method.parameters()), name
        if name == "nnclr":   # the global batch's view-1 projections went into the queue
            assert int(method.queue_filled) == 4 and int(method.queue_ptr) == 4
            method(batch(seed=1))
            assert int(method.queue_filled) == 6 and int(method.queue_ptr) == 2
            assert "queue" in method.state_dict()


def test_views_differ_and_are_deterministic_per_scan_and_epoch():
    method = build_method(tiny_cfg("adapn", "contrastive.augment.p=1.0",
                                   "contrastive.augment.cutout_size=6"))
    b = batch(b=2)
    views = method.make_views(b["x"], b["index"])
    assert views.shape == (4, 1, 16, 16, 16)
    assert not torch.equal(views[0], views[2])                  # two views of scan 0 differ
    assert (views[0] == 0).sum() >= 6 ** 3                      # each carries a cutout box
    torch.testing.assert_close(method.make_views(b["x"], b["index"]), views)
    method.set_progress(1, 0, 1)
    assert not torch.equal(method.make_views(b["x"], b["index"]), views)   # new epoch, new draw
    g1, g2 = view_generator(0, 0, 5), view_generator(0, 0, 5)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_adapn_schedule_counts_global_scans():
    method = build_method(tiny_cfg("adapn", "contrastive.nn_final=2", "contrastive.nn_step=1"))
    method(batch())                           # epoch 0: NN_nb = batch = 4 scans (all 7 others)
    assert method.scalars() == {"nn_nb": 4.0}
    method.set_progress(3, 0, 1)              # last epoch of 4: NN_final
    method(batch())
    assert method.scalars() == {"nn_nb": 2.0}
    assert build_method(tiny_cfg("yaware")).scalars() == {}


def test_missing_ages_are_refused_for_label_losses():
    method = build_method(tiny_cfg("adapn"))
    b = batch()
    b["age"][1] = float("nan")
    with pytest.raises(ValueError, match="finite age"):
        method(b)
    assert torch.isfinite(build_method(tiny_cfg("simclr"))(b)["loss"])   # SimCLR ignores ages


@pytest.mark.parametrize("override, message", [
    ("contrastive.kernel=laplace", "kernel"), ("contrastive.distance=hamming", "distance"),
    ("model.features=middle", "features"), ("model.backbone=vgg", "backbone")])
def test_bad_options_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        build_method(tiny_cfg("adapn", override))
