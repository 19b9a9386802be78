"""SOM health and grid-quality metrics on hand-worked cases: occupancy, quantisation and
topographic error, permutation p-values; the BatchNorm mode of the k-means encoding; the
nodes' learning-rate group."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from hpcbrain.evaluate.interpretability import grid_dcor, grid_dcor_test, node_statistics, score_grid
from hpcbrain.methods.lsor import batch_norm_mode
from hpcbrain.methods.som import som_health, som_health_sums


def test_som_health_on_a_hand_worked_2x2_grid():
    # nodes at the corners of a unit square, row-major: 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1) in the
    # grid; in latent space node k sits at G[k]
    G = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z = torch.tensor([
        [0.1, 0.0],    # BMU 0 (d 0.1), second 1 (grid neighbour)       -> no error
        [0.9, 0.2],    # BMU 1 (d √0.05), second 3 (grid neighbour)      -> no error
        [0.6, 0.55],   # BMU 3 (d √0.3625), second 1... see below
        [0.1, 0.1],    # BMU 0 again
    ])
    # z[2]: squared distances 0.6625, 0.4625, 0.5625, 0.3625 -> BMU 3, second 1: neighbours.
    sums = som_health_sums(z, G, (2, 2))
    health = som_health(sums, 4)
    assert health["occupied_nodes"] == 3            # nodes 0, 1, 3; node 2 empty
    assert health["counts"].tolist() == [2.0, 1.0, 0.0, 1.0]
    expected_qe = (0.1 + np.sqrt(0.05) + np.sqrt(0.3625) + np.sqrt(0.02)) / 4
    assert health["quantisation_error"] == pytest.approx(expected_qe)
    assert health["topographic_error"] == 0.0
    np.testing.assert_allclose(health["latent_mean"].numpy(), z.double().mean(0).numpy())
    zn = z.double().numpy()
    spread = np.sqrt(((zn - zn.mean(0)) ** 2).sum(1).mean())
    assert health["latent_spread"] == pytest.approx(float(spread))


def test_topographic_error_counts_latents_whose_two_nearest_nodes_are_not_grid_neighbours():
    # 1×3 grid whose middle node sits far away in latent space: for a latent near node 0 the
    # second nearest is node 2, two grid steps away -> a topographic error
    G = torch.tensor([[0.0], [10.0], [1.0]])
    z = torch.tensor([[0.2], [0.9], [9.0], [10.5]])
    # z0: nearest 0, then 2 (error); z1: 2 then 0 (error); z2: 1 then 2 (neighbours);
    # z3: 1 then 2 (neighbours)
    health = som_health(som_health_sums(z, G, (1, 3)), 3)
    assert health["topographic_error"] == pytest.approx(0.5)
    # sums add up over batches (and ranks): two halves give the same statistics
    halves = som_health_sums(z[:2], G, (1, 3)) + som_health_sums(z[2:], G, (1, 3))
    torch.testing.assert_close(halves, som_health_sums(z, G, (1, 3)))


def test_node_statistics_and_occupancy():
    bmu = np.array([0, 0, 2, 2, 2, 5])
    ages = np.array([60.0, 70.0, 80.0, 82.0, np.nan, 90.0])
    means = node_statistics(bmu, ages, 6)
    np.testing.assert_allclose(means, [65.0, np.nan, 81.0, np.nan, np.nan, 90.0])
    metrics = score_grid(bmu, {"age": ages}, 2, 3, n_permutations=20)
    assert metrics["som/occupied_nodes"] == 3.0


def test_permutation_p_matches_the_exact_null_on_a_tiny_grid():
    # 1×4 grid, 4 scans, one per node: the null (node labels shuffled over scans) has 24 equally
    # likely permutations, so the exact p is the share of them whose dCor >= the observed one.
    bmu = np.array([0, 1, 2, 3])
    values = np.array([1.0, 2.0, 4.0, 3.0])
    observed = grid_dcor(node_statistics(bmu, values, 4), 1, 4)
    null = [grid_dcor(node_statistics(np.array(p), values, 4), 1, 4)
            for p in itertools.permutations(bmu)]
    exact = np.mean([n >= observed - 1e-12 for n in null])
    dcor, p = grid_dcor_test(bmu, values, 1, 4, n_permutations=4000, seed=3)
    assert dcor == pytest.approx(observed)
    assert p == pytest.approx(exact, abs=0.02)
    assert 0.1 < exact < 0.5     # the case is neither trivially significant nor trivially not


def test_an_ordered_grid_is_significant_and_a_scrambled_one_is_not():
    rng = np.random.default_rng(0)
    rows, cols = 4, 8
    bmu = np.repeat(np.arange(rows * cols), 5)
    ordered = (bmu % cols) * 3.0 + 60 + rng.normal(0, 0.5, bmu.size)   # age grows along columns
    dcor, p = grid_dcor_test(bmu, ordered, rows, cols, n_permutations=300)
    assert dcor > 0.9 and p == pytest.approx(1 / 301)
    scrambled = rng.permutation(ordered)
    dcor, p = grid_dcor_test(bmu, scrambled, rows, cols, n_permutations=300)
    assert p > 0.05


class _TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 1)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.norm(self.conv(x)).flatten(1)


def test_batch_norm_mode_uses_batch_statistics_without_changing_the_model():
    torch.manual_seed(0)
    net = _TinyEncoder()
    net.norm.running_mean.fill_(3.0)
    net.norm.running_var.fill_(4.0)
    net.train()
    x = torch.randn(8, 1, 5) + 2.0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad(), batch_norm_mode(net, use_batch_statistics=True):
        batch_stats = net(x)
        assert net.norm.training and not net.training
    # batch statistics: each channel normalised to mean 0 over batch and length
    np.testing.assert_allclose(batch_stats.reshape(8, 2, 5).mean((0, 2)).numpy(), 0, atol=1e-6)
    with torch.no_grad(), batch_norm_mode(net, use_batch_statistics=False):
        running = net(x)
    expected = (net.conv(x) - 3.0) / np.sqrt(4.0 + net.norm.eps) * net.norm.weight[:, None] \
        + net.norm.bias[:, None]
    torch.testing.assert_close(running, expected.flatten(1).detach())
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert net.training and net.norm.training      # modes restored


def test_lsor_nodes_get_their_own_learning_rate(tmp_path):
    from hpcbrain.config import load_config
    from hpcbrain.engine.backends import build_optimizer
    from hpcbrain.methods.lsor import LSOR

    cfg = load_config(["lsor.yaml"], ["data.input_size=16", "model.widths=[4,4,4,4]",
                                      "lsor.grid_rows=2", "lsor.grid_cols=2",
                                      "lsor.node_lr_scale=10", "train.lr=0.001"])
    method = LSOR.from_config(cfg)
    optimizer = build_optimizer(cfg.train, method)
    by_lr = {round(g["lr"], 9): g["params"] for g in optimizer.param_groups}
    assert set(by_lr) == {0.001, 0.01}
    assert len(by_lr[0.01]) == 1 and by_lr[0.01][0] is method.G
    assert sum(p.numel() for p in by_lr[0.001]) + method.G.numel() == \
        sum(p.numel() for p in method.parameters())
