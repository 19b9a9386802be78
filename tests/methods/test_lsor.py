"""LSOR: public functions pinned by hand-worked cases, losses, stop-gradients, phases, EMA,
SOM initialisation and checkpoint state."""
import math

import numpy as np
import pytest
import torch
from conftest import TINY_LSOR, tiny_config

from hpcbrain.methods import build_method
from hpcbrain.methods.lsor import LSOR, batch_norm_mode
from hpcbrain.methods.som import (
    centre_update,
    ema_update,
    lsor_losses,
    similarity_grid,
    som_weights,
    tau_at,
)
from hpcbrain.methods.som_init import (
    grid_neighbour_cost,
    init_reference_trajectories,
    kmeans_grid_init,
    pca_grid_init,
    reorder_to_grid,
)
from hpcbrain.models import ConvAutoencoder

torch.set_num_threads(1)


def make_cfg(**lsor):
    """The paper's λ's, τ's and EMA (lsor.yaml) on a 2×3 grid at 16³, 2 + 2 epochs."""
    return tiny_config("lsor.yaml", **{**TINY_LSOR, **{f"lsor.{k}": v for k, v in lsor.items()}})


def make_batches(n_pairs, batch_size, seed=0, with_idx=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_pairs, batch_size):
        b = min(batch_size, n_pairs - start)
        batch = {
            "x_u": torch.randn(b, 1, 16, 16, 16, generator=g),
            "x_v": torch.randn(b, 1, 16, 16, 16, generator=g),
            "dt": 0.5 + torch.rand(b, generator=g) * 2,
        }
        if with_idx:
            batch["index_u"] = torch.arange(start, start + b) * 2
            batch["index_v"] = torch.arange(start, start + b) * 2 + 1
        out.append(batch)
    return out


def make_model(**lsor):
    torch.manual_seed(0)
    return LSOR.from_config(make_cfg(**lsor))


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def test_som_weights_hand_2x3():
    # grid 2×3, row-major: k=0 (0,0) 1 (0,1) 2 (0,2) / 3 (1,0) 4 (1,1) 5 (1,2)
    # bmu = 4 = (1,1): Manhattan d = [2, 1, 2, 1, 0, 1]
    # t = 1: w ∝ exp(−d²/(2·6·1²)) = exp(−d²/12) → [e^{-1/3}, e^{-1/12}, e^{-1/3}, e^{-1/12}, 1, e^{-1/12}]
    a, b = math.exp(-1 / 3), math.exp(-1 / 12)
    raw = [a, b, a, b, 1.0, b]
    expect4 = [r / sum(raw) for r in raw]
    # bmu = 0 = (0,0): d = [0, 1, 2, 1, 2, 3]; t = 0.5: exp(−d²/(2·6·0.25)) = exp(−d²/3)
    raw0 = [math.exp(-(d ** 2) / 3) for d in [0, 1, 2, 1, 2, 3]]
    expect0 = [r / sum(raw0) for r in raw0]
    w4 = som_weights(torch.tensor([4]), (2, 3), 1.0)
    w0 = som_weights(torch.tensor([0]), (2, 3), 0.5)
    assert w4.shape == (1, 6)
    torch.testing.assert_close(w4[0], torch.tensor(expect4), rtol=0, atol=1e-7)
    torch.testing.assert_close(w0[0], torch.tensor(expect0), rtol=0, atol=1e-7)
    both = som_weights(torch.tensor([4, 0]), (2, 3), 1.0)
    torch.testing.assert_close(both.sum(1), torch.ones(2))


def test_tau_at():
    assert tau_at(0, 100, 0.1, 1.0) == pytest.approx(1.0)
    assert tau_at(100, 100, 0.1, 1.0) == pytest.approx(0.1)
    # midpoint: 1·(0.1/1)^(1/2) = √0.1, the geometric mean of τmin and τmax
    assert tau_at(50, 100, 0.1, 1.0) == pytest.approx(math.sqrt(0.1 * 1.0))
    assert tau_at(250, 100, 0.1, 1.0) == pytest.approx(0.1)  # clamped
    assert tau_at(5, 0, 0.1, 1.0) == pytest.approx(0.1)      # no SOM phase: no division by 0


def test_similarity_grid_hand():
    z = torch.tensor([[0.0, 0.0]])
    G = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # d = ‖z − g_k‖² = [0, 1, 4]; mean 5/3; unbiased var = ((5/3)² + (2/3)² + (7/3)²)/2 = 13/3
    gamma = math.sqrt(13 / 3)
    assert torch.std(torch.tensor([0.0, 1.0, 4.0])).item() == pytest.approx(gamma)
    e = [math.exp(-d / gamma) for d in [0, 1, 4]]
    expect = torch.tensor([[v / sum(e) for v in e]])
    torch.testing.assert_close(similarity_grid(z, G), expect, rtol=0, atol=1e-6)


def test_ema_update_hand_with_empty_cluster():
    ref = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    dz = torch.tensor([[3.0, 1.0], [5.0, 3.0], [10.0, 0.0]])
    cluster = torch.tensor([0, 0, 2])
    ref_before = ref.clone()
    out = ema_update(ref, dz, cluster, alpha=0.5)
    # node 0: mean dz = [4, 2] → 0.5·[1,1] + 0.5·[4,2] = [2.5, 1.5]
    # node 1: no member → keeps [2, 2]
    # node 2: 0.5·[3,3] + 0.5·[10,0] = [6.5, 1.5]
    torch.testing.assert_close(out, torch.tensor([[2.5, 1.5], [2.0, 2.0], [6.5, 1.5]]))
    assert torch.equal(ref, ref_before)  # not modified in place
    assert out.data_ptr() != ref.data_ptr()


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def decode_identity(z):
    # latent [B, 2] read as a volume [B, 1, 2, 1, 1]
    return z.reshape(-1, 1, 2, 1, 1)


def test_losses_hand():
    # grid 1×2, G = [[0,0],[2,0]], one pair
    G = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    dG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_u, z_v = torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 1.0]])
    x_u = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    x_v = torch.tensor([2.0, 2.0]).reshape(1, 1, 2, 1, 1)
    dt = torch.tensor([2.0])
    out = lsor_losses(x_u, x_v, z_u, z_v, dt, decode_identity, G, dG, 1.0, (1, 2))
    # distances: z_u → [0.25, 2.25] (bmu 0), z_v → [5, 1] (bmu 1)
    assert out["bmu_u"].tolist() == [0] and out["bmu_v"].tolist() == [1]
    # recon_z: (z − x)² = [0.25, 0] and [0, 1] → mean 1.25/4
    assert out["recon_z"].item() == pytest.approx(1.25 / 4)
    # recon_g: g_u = [0,0] vs [1,0] → [1, 0]; g_v = [2,0] vs [2,2] → [0, 4] → mean 5/4
    assert out["recon_g"].item() == pytest.approx(5 / 4)
    assert out["recon"].item() == pytest.approx(1.25 / 4 + 5 / 4)
    # commit: (z − g)² = [0.25, 0] and [0, 1] → mean over 4 elements
    assert out["commit"].item() == pytest.approx(1.25 / 4)
    # som: grid (1,2), t=1: w ∝ exp(−d²/(2·2·1)) → bmu 0: [1, e^{-1/4}]/(1+e^{-1/4}); bmu 1 mirrored
    e = math.exp(-0.25)
    w_near, w_far = 1 / (1 + e), e / (1 + e)
    som = (w_near * 0.25 + w_far * 2.25 + w_far * 5.0 + w_near * 1.0) / 4  # mean over (2 scans × 2 nodes)
    assert out["som"].item() == pytest.approx(som, abs=1e-6)
    # dir: Δz = ([2,1] − [0.5,0]) / 2 = [0.75, 0.5]; ref ΔG[bmu_u = 0] = [1, 0]
    cos = 0.75 / math.sqrt(0.75 ** 2 + 0.5 ** 2)
    assert out["dir"].item() == pytest.approx(1 - cos, abs=1e-6)
    torch.testing.assert_close(out["dz"], torch.tensor([[0.75, 0.5]]))


def test_stop_gradients():
    torch.manual_seed(0)
    ae = ConvAutoencoder(widths=[2, 2], input_size=16)
    x_u, x_v = torch.randn(3, 1, 16, 16, 16), torch.randn(3, 1, 16, 16, 16)
    z = ae.encoder(torch.cat([x_u, x_v]))
    z_u, z_v = z[:3], z[3:]
    G = torch.randn(6, ae.latent_dim, requires_grad=True)
    dG = torch.randn(6, ae.latent_dim, requires_grad=True)
    out = lsor_losses(x_u, x_v, z_u, z_v, torch.ones(3), ae.decoder, G, dG, 0.5, (2, 3))
    enc = list(ae.encoder.parameters())

    # L_som: sg[z] → no gradient to the encoder, but it moves G
    g_enc = torch.autograd.grad(out["som"], enc, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in g_enc)
    (g_G,) = torch.autograd.grad(out["som"], G, retain_graph=True)
    assert g_G.abs().sum() > 0
    # L_dir: sg[ΔG] → no gradient path to ΔG; the encoder gets one through Δz
    (g_dG,) = torch.autograd.grad(out["dir"], dG, retain_graph=True, allow_unused=True)
    assert g_dG is None
    g_enc = torch.autograd.grad(out["dir"], enc, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_enc)
    # L_commit moves z (and g_ε)
    g_z, g_G = torch.autograd.grad(out["commit"], [z, G], retain_graph=True)
    assert g_z.abs().sum() > 0 and g_G.abs().sum() > 0
    # recon from g_ε trains G and the decoder, not the encoder (BMU is an argmin)
    g_enc = torch.autograd.grad(out["recon_g"], enc, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in g_enc)
    (g_G,) = torch.autograd.grad(out["recon_g"], G, retain_graph=True)
    assert g_G.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the method: phases, EMA, schedule
# ---------------------------------------------------------------------------------------------
def test_registry_and_interface():
    m = build_method(make_cfg())
    assert isinstance(m, LSOR) and m.batch_kind == "pairs"
    assert m.latent_dim == 8 * 4 ** 3
    z = m.encoder()(torch.randn(2, 1, 16, 16, 16))
    assert z.shape == (2, m.latent_dim)
    assert set(m.scalars()) == {"tau", "phase", "som_weight"}


def test_build_from_project_config():
    pytest.importorskip("hpcbrain.config")
    from hpcbrain.config import load_config

    cfg = load_config(overrides=["data.input_size=16", "model.widths=[4,8]",
                                 "lsor.grid_rows=4", "lsor.grid_cols=8"])
    m = build_method(cfg)
    assert isinstance(m, LSOR) and m.grid == (4, 8) and m.warmup_epochs == 10
    assert m.tau_max == 1.0 and m.tau_min == 0.1


def test_tau_schedule_over_som_phase():
    m = make_model()  # epochs 4, warm-up 2 → SOM phase = 2 epochs
    m.set_progress(1, 3, 5)  # warm-up
    assert m.tau == pytest.approx(1.0)
    m.set_progress(2, 0, 5)  # first SOM step: τmax
    assert m.tau == pytest.approx(1.0)
    m.set_progress(3, 0, 5)  # step 5 of total 2·5 = 10: geometric mean
    assert m.tau == pytest.approx(math.sqrt(0.1))
    m.set_progress(3, 4, 5)  # last step 9/10
    assert m.tau == pytest.approx(0.1 ** 0.9)


def test_warmup_recon_only_leaves_som_state():
    m = make_model().train()
    G0, dG0 = m.G.detach().clone(), m.dG.clone()
    batch = make_batches(2, 2)[0]
    m.set_progress(0, 0, 1)
    m.on_epoch_start(0, lambda: (_ for _ in ()).throw(AssertionError("no init during warm-up")))
    out = m(batch)
    assert set(out) == {"loss", "recon", "commit", "som", "dir"}
    assert out["commit"].item() == out["som"].item() == out["dir"].item() == 0.0
    torch.testing.assert_close(out["loss"].detach(), out["recon"])
    out["loss"].backward()
    assert m.G.grad is None
    assert torch.equal(m.G.detach(), G0) and torch.equal(m.dG, dG0)
    assert not m.initialised.item() and m.scalars()["phase"] == 0.0


def _initialised_model(**lsor):
    m = make_model(**lsor)
    m.on_epoch_start(m.warmup_epochs, lambda: iter(make_batches(8, 3)))
    assert m.initialised.item()
    return m


def test_som_phase_losses_and_ema_only_in_training():
    m = _initialised_model()
    m.set_progress(2, 0, 4)
    batch = make_batches(3, 3, seed=1)[0]

    # validation_step (even while in train mode): same losses, no state change at all
    m.train()
    state0 = {k: v.clone() for k, v in m.state_dict().items()}
    val = m.validation_step(batch)
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, state0[k]), k
    # eval-mode forward: no EMA either
    m.eval()
    ev = m(batch)
    assert torch.equal(m.dG, state0["dG"])
    for key in ("loss", "recon", "commit", "som", "dir"):
        torch.testing.assert_close(ev[key], val[key])

    # training forward: total = weighted sum; ΔG gets exactly one EMA step with Δz and bmu(z_u)
    m.train()
    out = m(batch)
    expect = out["recon"] + 0.5 * out["commit"] + 1.0 * out["som"] + 0.2 * out["dir"]
    torch.testing.assert_close(out["loss"].detach(), expect)
    assert all(out[k].item() > 0 for k in ("recon", "commit", "som", "dir"))
    with torch.no_grad():
        x_u, x_v = batch["x_u"], batch["x_v"]
        # recompute Δz in eval mode would differ (BatchNorm); use the loss function on train-mode z
        m2 = make_model()
        m2.load_state_dict(state0)
        m2.train()
        z = m2.net.encoder(torch.cat([x_u, x_v]))
        dz = (z[3:] - z[:3]) / batch["dt"].unsqueeze(1)
        expect_dG = ema_update(state0["dG"], dz, m2.bmu(z[:3]), 0.99)
    torch.testing.assert_close(m.dG, expect_dG, rtol=1e-5, atol=1e-6)
    assert not torch.equal(m.dG, state0["dG"])
    out["loss"].backward()
    assert m.G.grad is not None and m.G.grad.abs().sum() > 0


def test_centre_update_hand_worked():
    centre = torch.tensor([1.0, 2.0])
    z = torch.tensor([[1.0, 1.0], [3.0, 5.0]])          # mean (2, 3)
    # 0.5·(1, 2) + 0.5·(2, 3) = (1.5, 2.5); 0.9·(1, 2) + 0.1·(2, 3) = (1.1, 2.1)
    torch.testing.assert_close(centre_update(centre, z, 0.5), torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(centre_update(centre, z, 0.9), torch.tensor([1.1, 2.1]))
    assert torch.equal(centre_update(centre, z[:0], 0.5), centre)   # empty batch: unchanged
    assert torch.equal(centre, torch.tensor([1.0, 2.0]))              # input untouched


def test_centred_nodes_start_where_plain_ones_do_and_follow_the_latent_mean():
    """lsor.centred_nodes: the k-means grid is the same; G holds it relative to the scans' mean,
    each training step moves the centre to 0.5·centre + 0.5·mean(z of the step), the nodes
    (and so the BMUs, the SOM file and the losses) move with it, and G's gradient is the one
    the plain nodes would get."""
    batches = make_batches(8, 3)
    plain, centred = make_model(), make_model(centred_nodes=True)
    plain.on_epoch_start(plain.warmup_epochs, lambda: iter(batches))
    centred.on_epoch_start(centred.warmup_epochs, lambda: iter(batches))
    assert torch.count_nonzero(plain.latent_centre) == 0
    torch.testing.assert_close(centred.nodes, plain.nodes, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), batch_norm_mode(centred, use_batch_statistics=True):
        z_all = torch.cat([centred.encoder()(torch.cat([b["x_u"], b["x_v"]])) for b in batches])
    torch.testing.assert_close(centred.latent_centre, z_all.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(centred.G.detach(), plain.G.detach() - z_all.mean(0),
                               rtol=1e-4, atol=1e-5)

    for m in (plain, centred):
        m.train()
        m.set_progress(2, 0, 4)
    batch = make_batches(3, 3, seed=1)[0]
    with torch.no_grad():
        probe = make_model(centred_nodes=True)
        probe.load_state_dict(centred.state_dict())
        probe.train()
        z = probe.net.encoder(torch.cat([batch["x_u"], batch["x_v"]]))
    before = centred.latent_centre.clone()
    out_plain, out_centred = plain(batch), centred(batch)
    for key in ("loss", "commit", "som", "dir"):
        torch.testing.assert_close(out_centred[key], out_plain[key], rtol=1e-5, atol=1e-6)
    out_plain["loss"].backward()
    out_centred["loss"].backward()
    torch.testing.assert_close(centred.G.grad, plain.G.grad, rtol=1e-4, atol=1e-6)
    expect = 0.5 * before + 0.5 * z.mean(0)
    torch.testing.assert_close(centred.latent_centre, expect, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(plain.latent_centre) == 0
    torch.testing.assert_close(centred.nodes, centred.G.detach() + expect)
    # evaluation and the registered SOM use the moved nodes
    probe_z = centred.nodes.detach()[[4, 1]] + 1e-3
    assert centred.bmu(probe_z).tolist() == [4, 1]


def test_centred_nodes_are_what_the_som_file_holds(tmp_path):
    m = _initialised_model(centred_nodes=True)
    assert torch.count_nonzero(m.latent_centre) > 0
    (path,) = m.registry_files(tmp_path)
    with np.load(path) as som:
        np.testing.assert_allclose(som["nodes"], m.nodes.detach().numpy(), rtol=1e-6)
        assert not np.allclose(som["nodes"], m.G.detach().numpy())


def test_bmu_and_similarity_helpers():
    m = _initialised_model()
    z = m.G.detach()[[4, 1]] + 1e-3
    assert m.bmu(z).tolist() == [4, 1]
    rho = m.similarity(z)
    assert rho.shape == (2, 6)
    torch.testing.assert_close(rho.sum(1), torch.ones(2))
    assert rho.argmax(1).tolist() == [4, 1]


# ---------------------------------------------------------------------------------------------
# SOM initialisation
# ---------------------------------------------------------------------------------------------
def test_kmeans_grid_init_gives_K_nodes_near_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 5)) * 10
    lat = np.concatenate([c + 0.01 * rng.normal(size=(10, 5)) for c in centres])
    G = kmeans_grid_init(torch.tensor(lat), (2, 3), seed=0)
    assert G.shape == (6, 5) and G.dtype == torch.float32
    # every true centre is a node (in some grid order)
    d = np.linalg.norm(G.numpy()[:, None] - centres[None], axis=-1)
    assert sorted(d.argmin(1).tolist()) == list(range(6))
    assert d.min(1).max() < 0.05
    with pytest.raises(ValueError, match="nodes"):
        kmeans_grid_init(torch.tensor(lat[:4]), (2, 3))


def test_reorder_to_grid_lowers_neighbour_cost():
    # a 4×8 lattice with unit spacing embedded linearly in 10-d, shuffled
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 2)))
    rows, cols = np.meshgrid(np.arange(4), np.arange(8), indexing="ij")
    lattice = np.stack([rows.ravel(), cols.ravel()], 1) @ basis.T  # [32, 10]
    shuffled = lattice[rng.permutation(32)]
    optimum = 4 * 7 + 3 * 8  # 52 grid edges of length 1
    perm = reorder_to_grid(torch.tensor(shuffled), (4, 8))
    assert sorted(perm.tolist()) == list(range(32))
    cost = grid_neighbour_cost(shuffled[perm.numpy()], (4, 8))
    random_costs = [grid_neighbour_cost(shuffled[rng.permutation(32)], (4, 8)) for _ in range(20)]
    assert cost < min(random_costs)
    assert cost == pytest.approx(optimum, abs=1e-6)
    # arbitrary clouds: never worse than the identity order it could have kept
    cloud = rng.normal(size=(6, 7))
    perm = reorder_to_grid(cloud, (2, 3))
    assert grid_neighbour_cost(cloud[perm.numpy()], (2, 3)) <= min(
        grid_neighbour_cost(cloud[rng.permutation(6)], (2, 3)) for _ in range(10)) + 1e-9
    assert torch.equal(perm, reorder_to_grid(cloud, (2, 3)))  # deterministic


def test_reference_trajectories_pair_clusters_after_reordering():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(6, 4)) * 10
    velocity = rng.normal(size=(6, 4))  # the Δz of every pair starting in cluster j
    n_per = [5, 4, 6, 3, 5, 0]          # cluster 5 starts no pair (it holds only z_v scans)
    z_u, dz = [], []
    for j, n in enumerate(n_per):
        for _ in range(n):
            z_u.append(centres[j] + 0.01 * rng.normal(size=4))
            dz.append(velocity[j])
    z_u, dz = torch.tensor(np.array(z_u)), torch.tensor(np.array(dz))
    scans = torch.cat([z_u, torch.tensor(centres[5] + 0.01 * rng.normal(size=(3, 4)))])
    G = kmeans_grid_init(scans, (2, 3), seed=0)
    dG = init_reference_trajectories(z_u, dz, G)
    node_to_cluster = np.linalg.norm(G.numpy()[:, None] - centres[None], axis=-1).argmin(1)
    global_mean = dz.mean(0).float()
    for k, j in enumerate(node_to_cluster):
        expect = global_mean if j == 5 else torch.tensor(velocity[j], dtype=torch.float32)
        torch.testing.assert_close(dG[k], expect, rtol=0, atol=1e-5)


def _expected_init(m, batches, use_batch_statistics):
    """G, ΔG computed by hand from the model's latents: each training batch encoded as one
    [x_u; x_v] forward, with its own batch statistics or the running ones."""
    with torch.no_grad(), batch_norm_mode(m, use_batch_statistics=use_batch_statistics):
        z = [m.encoder()(torch.cat([b["x_u"], b["x_v"]])) for b in batches]
    n = [b["x_u"].shape[0] for b in batches]
    z_u = torch.cat([zi[:k] for zi, k in zip(z, n)])
    z_v = torch.cat([zi[k:] for zi, k in zip(z, n)])
    dt = torch.cat([b["dt"] for b in batches])
    G = kmeans_grid_init(torch.cat([z_u, z_v]), (2, 3), seed=0)
    return G, init_reference_trajectories(z_u, (z_v - z_u) / dt[:, None], G)


def test_pca_grid_init_hand_worked():
    """10 latents on the plane z = 30 around (10, 20): x ∈ {−2, −1, 0, 1, 2} twice, y = ±0.5.
    Standard deviations (ddof 1): √(20/9) = 1.4907 along x, √(2.5/9) = 0.5270 along y. A 2×3
    grid puts its 3 columns along x at (−√3, 0, √3)·1.4907 and its rows along y at ±√3·0.5270."""
    xs = [-2, -1, 0, 1, 2]
    lat = torch.tensor([[10.0 + x, 20.0 + y, 30.0] for x in xs for y in (-0.5, 0.5)])
    G = pca_grid_init(lat, (2, 3))
    a, b = math.sqrt(3) * math.sqrt(20 / 9), math.sqrt(3) * math.sqrt(2.5 / 9)
    expect = torch.tensor([[10 + ca, 20 + rb, 30.0] for rb in (-b, b) for ca in (-a, 0.0, a)])
    torch.testing.assert_close(G, expect, rtol=0, atol=1e-5)
    # a tall grid (3×2) puts its long side, the rows, along the first component
    tall = pca_grid_init(lat, (3, 2)).reshape(3, 2, 3)          # [row, col, coordinate]
    torch.testing.assert_close(tall[:, 0, 0], torch.tensor([10 - a, 10.0, 10 + a]))
    torch.testing.assert_close(tall[1, :, 1], torch.tensor([20 - b, 20 + b]))


def test_pca_grid_init_along_a_given_first_axis():
    """The same 10 latents, first axis (0, −2, 0) (say the ageing direction, pointing to −y):
    the long side runs along −y (std √(2.5/9) there, first column at +y), the short side along
    what remains, x (std √(20/9)), in the sign of its largest coordinate (+x)."""
    xs = [-2, -1, 0, 1, 2]
    lat = torch.tensor([[10.0 + x, 20.0 + y, 30.0] for x in xs for y in (-0.5, 0.5)])
    G = pca_grid_init(lat, (2, 3), first_axis=torch.tensor([0.0, -2.0, 0.0]))
    a, b = math.sqrt(3) * math.sqrt(2.5 / 9), math.sqrt(3) * math.sqrt(20 / 9)
    expect = torch.tensor([[10 + rb, 20 - ca, 30.0] for rb in (-b, b) for ca in (-a, 0.0, a)])
    torch.testing.assert_close(G, expect, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="first_axis"):
        pca_grid_init(lat, (2, 3), first_axis=torch.zeros(3))


def initialised_with(init: str):
    """(model after its SOM start with `init`, every scan's latent, every pair's Δz), the
    latents encoded as the start encodes them (batch statistics)."""
    m = make_model(init=init)
    batches = make_batches(8, 3, with_idx=True)
    m.on_epoch_start(2, lambda: iter(batches))
    with torch.no_grad(), batch_norm_mode(m, use_batch_statistics=True):
        z = [m.encoder()(torch.cat([b["x_u"], b["x_v"]])) for b in batches]
    n = [b["x_u"].shape[0] for b in batches]
    scans = torch.cat([zi[:k] for zi, k in zip(z, n)] + [zi[k:] for zi, k in zip(z, n)])
    dz = torch.cat([(zi[k:] - zi[:k]) / b["dt"].unsqueeze(1) for zi, k, b in zip(z, n, batches)])
    return m, scans, dz


def test_lsor_init_pca_starts_from_the_latents_principal_plane():
    m, scans, _ = initialised_with("pca")
    torch.testing.assert_close(m.G.detach(), pca_grid_init(scans, (2, 3)), rtol=1e-4, atol=1e-4)


def test_lsor_init_longitudinal_lays_the_long_side_along_the_mean_dz():
    m, scans, dz = initialised_with("longitudinal")
    expect = pca_grid_init(scans, (2, 3), first_axis=dz.mean(0))
    torch.testing.assert_close(m.G.detach(), expect, rtol=1e-4, atol=1e-4)
    # columns advance along the mean Δz: each step right moves the node forward along it
    grid = m.G.detach().reshape(2, 3, -1)
    step = grid[:, 1:] - grid[:, :-1]
    assert (step @ dz.mean(0) > 0).all()


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_initialise_som_end_to_end_and_dedup(mode):
    m = make_model(init_bn_mode=mode)
    batches = make_batches(8, 3, with_idx=True)
    running = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    # repeat the first batch (as a padding sampler would): de-duplicated by index_u / index_v
    m.on_epoch_start(2, lambda: iter(batches + batches[:1]))
    assert m.initialised.item() and m.training
    for key, value in running.items():       # encoding never moves the running statistics
        torch.testing.assert_close(m.state_dict()[key], value)
    G, dG = _expected_init(m, batches, use_batch_statistics=mode == "batch")
    torch.testing.assert_close(m.G.detach(), G, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.dG, dG, rtol=1e-4, atol=1e-5)
    # and the two modes really differ at initialisation (so the choice matters)
    other, _ = _expected_init(m, batches, use_batch_statistics=mode != "batch")
    assert not torch.allclose(other, G, atol=1e-3)


def test_warmup_zero_initialises_at_epoch_zero():
    m = make_model(warmup_epochs=0)
    m.on_epoch_start(0, lambda: iter(make_batches(8, 4)))
    assert m.initialised.item()


def test_state_dict_round_trip_and_no_reinit_on_resume():
    m = _initialised_model()
    m.train()
    m.set_progress(2, 0, 3)
    m(make_batches(3, 3, seed=3)[0])  # one EMA step
    sd = m.state_dict()
    assert {"G", "dG", "initialised"} <= set(sd)
    fresh = make_model()
    assert not fresh.initialised.item()
    fresh.load_state_dict(sd)
    assert fresh.initialised.item()
    assert torch.equal(fresh.G.detach(), m.G.detach()) and torch.equal(fresh.dG, m.dG)

    def must_not_run():
        raise AssertionError("k-means re-ran after resume")

    fresh.on_epoch_start(2, must_not_run)
    fresh.on_epoch_start(3, must_not_run)
    assert torch.equal(fresh.G.detach(), m.G.detach())


def test_som_health_warns_about_a_collapsed_grid_only_once_tau_has_shrunk(caplog):
    """epochs 4, warm-up 2: the SOM phase is epochs 2-3, half of it done at the end of epoch 2;
    at the end of epoch 1 (the grid just initialised) none of it is."""
    m = _initialised_model()
    with torch.no_grad():
        m.G.data[1:] += 1e3                  # every latent's best-matching node is node 0
    batches = make_batches(8, 3)
    with caplog.at_level("WARNING", logger="hpcbrain.methods.lsor"):
        early = m.on_epoch_end(1, lambda: iter(batches))
    assert early["som/train_occupied_nodes"] == 1 and not caplog.records
    with caplog.at_level("WARNING", logger="hpcbrain.methods.lsor"):
        late = m.on_epoch_end(2, lambda: iter(batches))
    assert late["som/train_occupied_nodes"] == 1
    assert late["som/latent_drift"] == pytest.approx(0.0, abs=1e-9)   # nothing trained between
    assert late["som/node_movement"] == 0.0
    (record,) = caplog.records
    assert "only 1 of 6 nodes" in record.getMessage() and "node_lr_scale" in record.getMessage()


def test_som_losses_ramp_in_over_som_ramp_epochs():
    # 2 warm-up epochs, ramp over 1.5 epochs of 4 steps = 6 steps: SOM step k (from 0) weighs
    # (k + 1)/6, from step 5 on fully
    m = _initialised_model(som_ramp_epochs=1.5)
    batch = make_batches(3, 3, seed=1)[0]
    m.eval()                                   # no EMA, no BatchNorm updates between calls
    for epoch, step, weight in ((2, 0, 1 / 6), (2, 3, 4 / 6), (3, 1, 1.0), (3, 3, 1.0)):
        m.set_progress(epoch, step, 4)
        assert m.scalars()["som_weight"] == pytest.approx(weight)
        out = m(batch)
        expect = out["recon"] + weight * (0.5 * out["commit"] + out["som"] + 0.2 * out["dir"])
        torch.testing.assert_close(out["loss"].detach(), expect)
    assert make_model().scalars()["som_weight"] == 1.0          # paper: no ramp
