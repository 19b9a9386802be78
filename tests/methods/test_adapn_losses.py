"""The contrastive-regression losses on cases worked out by hand, plus brute-force references.

The hand case (temperature 1, so s_ik = z_i·z_k): four unit vectors in 2-D

    z0 = (1, 0)   z1 = (0.6, 0.8)   z2 = (0, 1)   z3 = (−0.8, 0.6)

    s01 = 0.6   s02 = 0     s03 = −0.8
    s12 = 0.8   s13 = 0     s23 = 0.6

Manhattan distances: d01 = 1.2, d02 = 2, d03 = 2.4, d12 = 0.8, d13 = 1.6, d23 = 1.2, so the
neighbours in order are 0: (1, 2, 3), 1: (2, 0, 3), 2: (1, 3, 0), 3: (2, 1, 0).

Labels y = (0, 1, 1, 2) with the RBF width σ = 1/√(2 ln 2), chosen so that
w(Δ) = exp(−Δ²/(2σ²)) = 2^(−Δ²):  w(0) = 1, w(1) = 1/2, w(2) = 1/16:

    w01 = 1/2   w02 = 1/2   w03 = 1/16
    w12 = 1     w13 = 1/2   w23 = 1/2

Per-anchor normalised weights ŵ_ik = w_ik / Σ_{t≠i} w_it:
    anchor 0: (8/17, 8/17, 1/17) on (1, 2, 3)      anchor 1: (1/4, 1/2, 1/4) on (0, 2, 3)
    anchor 2: (1/4, 1/2, 1/4) on (0, 1, 3)         anchor 3: (1/17, 8/17, 8/17) on (0, 1, 2)
and the attraction Σ_k ŵ_ik s_ik:
    anchor 0: 8/17·0.6 + 8/17·0 + 1/17·(−0.8) = 4/17      anchor 1: 0.15 + 0.4 + 0 = 0.55
    anchor 2: 0 + 0.4 + 0.15 = 0.55                       anchor 3: (−0.8 + 0 + 4.8)/17 = 4/17
Since Σ_k ŵ_ik = 1, every loss with one denominator per anchor is l_i = −attraction_i + log den_i.
AdapN's repulsion exponents s_it·(1 − w_it):
    0→1: 0.6·½ = 0.3   0→2: 0   0→3: −0.8·15/16 = −0.75   1→2: 0.8·0 = 0   1→3: 0
    2→3: 0.6·½ = 0.3  (symmetric)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpcbrain.methods.contrastive_losses import (
    adapn_loss,
    exponential_loss,
    kernel_weights,
    nearest_neighbour_mask,
    nnclr_loss,
    pairwise_distance,
    rnc_loss,
    simclr_loss,
    threshold_loss,
    yaware_loss,
)

E = math.exp
LOG = math.log
SIGMA = (2 * math.log(2)) ** -0.5
ATTRACT = [4 / 17, 0.55, 0.55, 4 / 17]


def hand_case():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6]], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    return z, y


def close(value, expected):
    assert float(value) == pytest.approx(float(expected), abs=1e-10)


# --- building blocks --------------------------------------------------------------------------
def test_hand_case_weights():
    _, y = hand_case()
    w = kernel_weights(y, y, "rbf", SIGMA)
    expected = torch.tensor([[1, 1 / 2, 1 / 2, 1 / 16], [1 / 2, 1, 1, 1 / 2],
                             [1 / 2, 1, 1, 1 / 2], [1 / 16, 1 / 2, 1 / 2, 1]], dtype=torch.float64)
    torch.testing.assert_close(w, expected)


def test_kernels():
    y0 = torch.tensor([0.0], dtype=torch.float64)
    y1 = torch.tensor([2.0], dtype=torch.float64)
    # Δ = 2, σ = 2: rbf exp(−4/8); gaussian that / (√(2π)·2); cauchy 1/(2·4 + 1)
    close(kernel_weights(y0, y1, "rbf", 2.0), E(-0.5))
    close(kernel_weights(y0, y1, "gaussian", 2.0), E(-0.5) / (math.sqrt(2 * math.pi) * 2))
    close(kernel_weights(y0, y1, "cauchy", 2.0), 1 / 9)
    with pytest.raises(ValueError, match="kernel"):
        kernel_weights(y0, y1, "laplace", 1.0)


def test_distances():
    a = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    close(pairwise_distance(a, b, "manhattan"), 7.0)     # 3 + 4
    close(pairwise_distance(a, b, "euclidean"), 5.0)     # √(9 + 16)
    close(pairwise_distance(a, b, "chebyshev"), 4.0)     # max(3, 4)
    u = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(pairwise_distance(u, v, "cosine"),
                               torch.tensor([[1.0, 2.0]], dtype=torch.float64))  # 1 − cos


def test_neighbours_depend_on_the_distance():
    # anchor (0, 0); candidates (3, 3): L1 6, L2 4.24, L∞ 3 — and (0, 5): L1 5, L2 5, L∞ 5
    z = torch.tensor([[0.0, 0.0], [3.0, 3.0], [0.0, 5.0]], dtype=torch.float64)
    first = lambda d: nearest_neighbour_mask(z, 1, d, torch.tensor([0]))[0].nonzero().item()
    assert first("manhattan") == 2
    assert first("euclidean") == 1
    assert first("chebyshev") == 1


def test_hand_case_neighbour_sets():
    z, _ = hand_case()
    mask = nearest_neighbour_mask(z, 2, "manhattan")
    sets = [set(row.nonzero().flatten().tolist()) for row in mask]
    assert sets == [{1, 2}, {2, 0}, {1, 3}, {2, 1}]
    assert not nearest_neighbour_mask(z, 3, "manhattan").diagonal().any()   # all others
    assert nearest_neighbour_mask(z, 10, "manhattan").sum() == 12


# --- AdapN ----------------------------------------------------------------------------------------
def test_adapn_one_neighbour():
    # NN(0) = {1}: den = e^0.3 → l0 = −[8/17·(0.6−0.3) + 8/17·(0−0.3) + 1/17·(−0.8−0.3)] = 1.1/17
    # NN(1) = {2}: den = e^0 → l1 = −0.55;  NN(2) = {1}: l2 = −0.55
    # NN(3) = {2}: den = e^0.3 → l3 = 1.1/17
    z, y = hand_case()
    terms = adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0, reduction="none")
    torch.testing.assert_close(terms, torch.tensor([1.1 / 17, -0.55, -0.55, 1.1 / 17],
                                                   dtype=torch.float64))
    close(adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0), (2.2 / 17 - 1.1) / 4)


def test_adapn_two_neighbours():
    # NN(0) = {1, 2}: den = e^0.3 + e^0;  NN(1) = {2, 0}: e^0 + e^0.3;  NN(2) = {1, 3}: e^0 + e^0.3
    # NN(3) = {2, 1}: e^0.3 + e^0  →  every log den = log(1 + e^0.3)
    z, y = hand_case()
    expected = [-a + LOG(1 + E(0.3)) for a in ATTRACT]
    torch.testing.assert_close(adapn_loss(z, y, 2, sigma=SIGMA, temperature=1.0, reduction="none"),
                               torch.tensor(expected, dtype=torch.float64))


def test_adapn_all_neighbours_is_exponential():
    # anchor 0: e^0.3 + e^0 + e^−0.75;  anchor 1: e^0.3 (t=0) + e^0 (t=2) + e^0 (t=3)
    # anchor 2: e^0 + e^0 + e^0.3;       anchor 3: e^−0.75 + e^0 + e^0.3
    z, y = hand_case()
    den = [E(0.3) + 1 + E(-0.75), E(0.3) + 2, E(0.3) + 2, E(0.3) + 1 + E(-0.75)]
    expected = sum(-a + LOG(d) for a, d in zip(ATTRACT, den)) / 4
    close(adapn_loss(z, y, 3, sigma=SIGMA, temperature=1.0), expected)
    close(adapn_loss(z, y, 99, sigma=SIGMA, temperature=1.0), expected)
    close(exponential_loss(z, y, sigma=SIGMA, temperature=1.0), expected)


def test_adapn_temperature_scales_similarities():
    # τ = 2 halves every s: anchor 1 with NN(1) = {2}: den = exp(0.4·0) = 1,
    # l1 = −(1/4·0.3 + 1/2·0.4 + 1/4·0) = −0.275
    z, y = hand_case()
    terms = adapn_loss(z, y, 1, sigma=SIGMA, temperature=2.0, reduction="none")
    close(terms[1], -0.275)


def test_adapn_far_lambda_weighting():
    # nn_nb 1, λ = 1, anchor 0: NN = {1}, radius r = d01 = 1.2; non-nearest weights
    # ν02 = 1.2/2 = 0.6, ν03 = 1.2/2.4 = 0.5 → den = e^0.3 + 0.6·e^0 + 0.5·e^−0.75
    z, y = hand_case()
    l0 = adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0, far_lambda=1.0,
                    anchors=torch.tensor([0]), reduction="none")
    close(l0[0], -4 / 17 + LOG(E(0.3) + 0.6 + 0.5 * E(-0.75)))
    # λ = 0 recovers Exponential, λ → ∞ plain AdapN
    close(adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0, far_lambda=0.0),
          exponential_loss(z, y, sigma=SIGMA, temperature=1.0))
    close(adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0, far_lambda=200.0),
          adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0))


def test_adapn_official_max_shift():
    # the official code uses s' = s − max_t s_it = s − 1 (the anchor's own s_ii = 1) in both the
    # positive term and the repulsion exponent s'·(1 − w). nn_nb = 1:
    # anchor 0: NN {1}: log den = (0.6 − 1)·½ = −0.2, attraction 4/17 − 1 → l0 = 0.8 − 4/17
    # anchor 1: NN {2}: log den = (0.8 − 1)·0 = 0, attraction 0.55 − 1 → l1 = 0.45 (= anchor 2)
    # anchor 3: NN {2}: log den = (0.6 − 1)·½ = −0.2 → l3 = 0.8 − 4/17
    z, y = hand_case()
    terms = adapn_loss(z, y, 1, sigma=SIGMA, temperature=1.0, max_shift=True, reduction="none")
    torch.testing.assert_close(terms, torch.tensor([0.8 - 4 / 17, 0.45, 0.45, 0.8 - 4 / 17],
                                                   dtype=torch.float64))


def _adapn_reference(z, y, nn_nb, sigma, temperature, p):
    """Loops, with the neighbour sets fixed from detached distances (DESIGN.md's formula)."""
    n = z.shape[0]
    s = z @ z.T / temperature
    w = torch.exp(-(y[:, None] - y[None]) ** 2 / (2 * sigma ** 2))
    zd = z.detach()
    total = 0
    for i in range(n):
        others = [t for t in range(n) if t != i]
        dist = {t: float((zd[i] - zd[t]).abs().pow(p).sum() ** (1 / p)) for t in others}
        nn = sorted(others, key=dist.get)[:nn_nb]
        log_den = torch.logsumexp(torch.stack([s[i, t] * (1 - w[i, t]) for t in nn]), 0)
        wsum = sum(w[i, t] for t in others)
        total = total - sum(w[i, k] / wsum * (s[i, k] - log_den) for k in others)
    return total / n


@pytest.mark.parametrize("nn_nb, distance, p", [(3, "manhattan", 1), (5, "euclidean", 2),
                                                 (1, "manhattan", 1)])
def test_adapn_matches_reference_value_and_gradient(nn_nb, distance, p):
    torch.manual_seed(0)
    z0 = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([20, 23, 31, 35, 47, 52, 60, 66, 71], dtype=torch.float64)
    z1 = z0.clone().requires_grad_()
    got = adapn_loss(z1, y, nn_nb, sigma=8.0, temperature=0.5, distance=distance)
    got.backward()
    z2 = z0.clone().requires_grad_()
    ref = _adapn_reference(z2, y, nn_nb, 8.0, 0.5, p)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(z1.grad, z2.grad)


def test_adapn_gradcheck_and_no_gradient_through_selection():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1).requires_grad_()
    y = torch.linspace(20, 80, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v: adapn_loss(v, y, 3, sigma=10.0, temperature=0.3), (z,))


def test_adapn_anchor_subsets_add_up():
    torch.manual_seed(2)
    z = F.normalize(torch.randn(10, 5, dtype=torch.float64), dim=1)
    y = torch.rand(10, dtype=torch.float64) * 60
    full = adapn_loss(z, y, 4, sigma=5.0, temperature=0.2, reduction="sum")
    parts = sum(adapn_loss(z, y, 4, sigma=5.0, temperature=0.2, anchors=a, reduction="sum")
                for a in (torch.arange(0, 3), torch.arange(3, 10)))
    torch.testing.assert_close(parts, full)


def test_adapn_input_checks():
    z, y = hand_case()
    with pytest.raises(ValueError, match="nn_nb"):
        adapn_loss(z, y, 0, sigma=1.0, temperature=1.0)
    with pytest.raises(ValueError, match="labels"):
        adapn_loss(z, y[:3], 1, sigma=1.0, temperature=1.0)
    with pytest.raises(ValueError, match="distance"):
        adapn_loss(z, y, 1, sigma=1.0, temperature=1.0, distance="hamming")


# --- Y-Aware, Threshold, RnC, SimCLR, NNCLR -----------------------------------------------------
def test_yaware_hand_case():
    # den_i = Σ_{t≠i} e^{s_it}: anchor 0: e^0.6 + e^0 + e^−0.8; 1: e^0.6 + e^0.8 + e^0;
    # 2: e^0 + e^0.8 + e^0.6; 3: e^−0.8 + e^0 + e^0.6
    z, y = hand_case()
    den = [E(0.6) + 1 + E(-0.8), E(0.6) + E(0.8) + 1, E(0.6) + E(0.8) + 1, E(0.6) + 1 + E(-0.8)]
    expected = [-a + LOG(d) for a, d in zip(ATTRACT, den)]
    torch.testing.assert_close(yaware_loss(z, y, sigma=SIGMA, temperature=1.0, reduction="none"),
                               torch.tensor(expected, dtype=torch.float64))


def test_threshold_hand_case():
    # den_ik = e^{s_ik} + Σ_{t: w_it < w_ik} e^{s_it}
    # anchor 0 (w = ½, ½, 1/16 on 1, 2, 3): k=1: e^0.6 + e^−0.8; k=2: e^0 + e^−0.8;
    #   k=3: e^−0.8 alone (log-prob 0) → l0 = −8/17·(0.6 − log(e^0.6 + e^−0.8))
    #                                        − 8/17·(0 − log(1 + e^−0.8))
    # anchor 1 (w = ½, 1, ½ on 0, 2, 3): only k=2 has lighter samples (0 and 3):
    #   l1 = −½·(0.8 − log(e^0.8 + e^0.6 + e^0)); anchor 2 likewise (k=1, lighter 0 and 3)
    # anchor 3 mirrors anchor 0: k=1 and k=2 each have the lighter sample 0 (s30 = −0.8)
    z, y = hand_case()
    l0 = -8 / 17 * (0.6 - LOG(E(0.6) + E(-0.8))) - 8 / 17 * (0 - LOG(1 + E(-0.8)))
    l1 = -0.5 * (0.8 - LOG(E(0.8) + E(0.6) + 1))
    torch.testing.assert_close(
        threshold_loss(z, y, sigma=SIGMA, temperature=1.0, reduction="none"),
        torch.tensor([l0, l1, l1, l0], dtype=torch.float64))


def test_rnc_hand_case():
    # S_ik = {t ≠ i : |y_i − y_t| ≥ |y_i − y_k|};  L = log(e^0.6 + e^0 + e^−0.8)
    # anchor 0 (gaps 1, 1, 2 to 1, 2, 3): k=1, k=2: S = {1, 2, 3} → L; k=3: S = {3} → 0
    #   l0 = −⅓·[(0.6 − L) + (0 − L) + 0]
    # anchor 1 (gaps 1, 0, 1 to 0, 2, 3): k=0, k=3: S = {0, 3} → log(e^0.6 + e^0);
    #   k=2 (gap 0): everyone → log(e^0.6 + e^0.8 + e^0)
    # anchor 2 = anchor 1 and anchor 3 = anchor 0 by symmetry of the similarities
    z, y = hand_case()
    big = LOG(E(0.6) + 1 + E(-0.8))
    l0 = -(0.6 - 2 * big) / 3
    pair = LOG(E(0.6) + 1)
    l1 = -((0.6 - pair) + (0.8 - LOG(E(0.6) + E(0.8) + 1)) + (0 - pair)) / 3
    torch.testing.assert_close(rnc_loss(z, y, temperature=1.0, reduction="none"),
                               torch.tensor([l0, l1, l1, l0], dtype=torch.float64))


def _threshold_reference(z, y, sigma, temperature):
    s = z @ z.T / temperature
    w = torch.exp(-(y[:, None] - y[None]) ** 2 / (2 * sigma ** 2))
    n, total = len(y), 0
    for i in range(n):
        others = [t for t in range(n) if t != i]
        wsum = sum(w[i, t] for t in others)
        for k in others:
            den = torch.exp(s[i, k]) + sum(torch.exp(s[i, t]) for t in others if w[i, t] < w[i, k])
            total = total - w[i, k] / wsum * (s[i, k] - torch.log(den))
    return total / n


def _rnc_reference(z, y, temperature):
    s = z @ z.T / temperature
    n, total = len(y), 0
    for i in range(n):
        for k in range(n):
            if k != i:
                den = sum(torch.exp(s[i, t]) for t in range(n)
                          if t != i and abs(y[i] - y[t]) >= abs(y[i] - y[k]))
                total = total - (s[i, k] - torch.log(den)) / (n - 1)
    return total / n


def test_threshold_and_rnc_match_brute_force_with_ties():
    torch.manual_seed(3)
    z0 = F.normalize(torch.randn(8, 3, dtype=torch.float64), dim=1)
    y = torch.tensor([30, 30, 41, 41, 41, 50, 62, 30], dtype=torch.float64)  # ties on purpose
    for fn, ref in ((lambda v: threshold_loss(v, y, sigma=9.0, temperature=0.4),
                     lambda v: _threshold_reference(v, y, 9.0, 0.4)),
                    (lambda v: rnc_loss(v, y, temperature=0.4),
                     lambda v: _rnc_reference(v, y, 0.4))):
        a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
        got, want = fn(a), ref(b)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(a.grad, b.grad)


def test_threshold_and_rnc_scale_without_a_cubic_tensor():
    # N = 1500: an N³ float32 tensor would need 13.5 GB; these run in O(N²) memory
    torch.manual_seed(4)
    z = F.normalize(torch.randn(1500, 8), dim=1)
    y = torch.rand(1500) * 60 + 20
    assert torch.isfinite(threshold_loss(z, y, sigma=2.0, temperature=0.1))
    assert torch.isfinite(rnc_loss(z, y, temperature=0.1))


def test_simclr_hand_case():
    # ids (0, 1, 0, 1): positives 0↔2 (s02 = 0) and 1↔3 (s13 = 0)
    # l0 = −(0 − log(e^0.6 + e^0 + e^−0.8)), l1 = −(0 − log(e^0.6 + e^0.8 + e^0)), l2 = l1-like
    z, _ = hand_case()
    ids = torch.tensor([0, 1, 0, 1])
    expected = [LOG(E(0.6) + 1 + E(-0.8)), LOG(E(0.6) + E(0.8) + 1),
                LOG(1 + E(0.8) + E(0.6)), LOG(E(-0.8) + 1 + E(0.6))]
    torch.testing.assert_close(simclr_loss(z, ids, temperature=1.0, reduction="none"),
                               torch.tensor(expected, dtype=torch.float64))


def test_nnclr_hand_case():
    # views z1 = [(1,0), (0,1)], z2 = [(0.6,0.8), (−0.8,0.6)], support {(1,0), (0,1), (0.6,0.8)}
    # q1 = nearest support of z1 = z1 itself; logits q1·z2ᵀ = [[0.6, −0.8], [0.8, 0.6]]
    #   → −log softmax: row 0 log(1 + e^−1.4), row 1 log(1 + e^0.2)
    # q2: (0.6,0.8) → itself; (−0.8,0.6) → dots (−0.8, 0.6, 0) → (0,1)
    #   logits q2·z1ᵀ = [[0.6, 0.8], [0, 1]] → row 0 log(1 + e^0.2), row 1 log(1 + e^−1)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.6, 0.8], [-0.8, 0.6]], dtype=torch.float64)
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    expected = [0.5 * (LOG(1 + E(-1.4)) + LOG(1 + E(0.2))),
                0.5 * (LOG(1 + E(0.2)) + LOG(1 + E(-1.0)))]
    torch.testing.assert_close(nnclr_loss(z1, z2, support, temperature=1.0, reduction="none"),
                               torch.tensor(expected, dtype=torch.float64))
    # no support yet: the views themselves (SimCLR's two-view cross-entropy)
    assert torch.isfinite(nnclr_loss(z1, z2, None, temperature=1.0))
    # one scan (a validation set's last batch): two views, no negatives, loss log 1 = 0 —
    # SimCLR's value for the same batch — rather than an error that ends the run
    one = nnclr_loss(z1[:1], z2[:1], support, temperature=1.0)
    assert one.item() == 0.0
    assert simclr_loss(torch.cat([z1[:1], z2[:1]]), torch.tensor([0, 0]),
                       temperature=1.0).item() == 0.0
