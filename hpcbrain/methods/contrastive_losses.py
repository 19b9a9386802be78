"""The contrastive-regression losses of AdapN (Träuble et al., TMLR 2024) and its baselines.

Every loss takes L2-normalised projections ``z`` [N, d] of all N samples (views stacked) and
per-sample labels; similarities are s_ik = z_i·z_k / temperature. Conventions (DESIGN.md):

* kernel weights w_ik = K(y_i − y_k): rbf exp(−Δ²/2σ²) (default), gaussian rbf/(√(2π)σ),
  cauchy 1/(σΔ² + 1); per anchor normalised over t ≠ i: ŵ_ik = w_ik / Σ_{t≠i} w_it;
* every loss is the mean over anchors of a per-anchor term l_i.

Losses, each function documenting its l_i (the family side by side: docs/adapn.md): AdapN
(`adapn_loss`, paper Eq. 2, neighbours chosen without gradient; appendix A.1's far-sample
weighting), Exponential and Threshold (Barbano et al. 2023), Y-Aware (Dufumier et al. 2021),
Rank-N-Contrast (Zha et al. 2023), SimCLR (NT-Xent over scan ids) and NNCLR (Dwibedi et al.
2021). Threshold and Rank-N-Contrast read each pair's label-dependent denominator from sorted
prefix log-sum-exps: O(N²) memory, no N³ tensor. The official code's variants (logit shift,
global weight normalisation, RnC's −‖z_i − z_k‖ similarity) are keyword switches.

Distributed use (`hpcbrain.methods.contrastive`): every loss accepts ``anchors`` (indices of the
anchors this process owns in the gathered global batch) and ``reduction`` ("mean", "sum",
"none"); neighbour sets, label weights and denominators always run over all N samples, so
per-rank sums of l_i add up to the single-process sum exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DISTANCES", "KERNELS", "WEIGHT_NORMS", "LOSSES", "RNC_SIMILARITIES",
           "kernel_weights", "pairwise_distance", "nearest_neighbour_mask", "adapn_loss",
           "exponential_loss", "yaware_loss", "threshold_loss", "rnc_loss", "simclr_loss",
           "nnclr_loss"]

DISTANCES = ("manhattan", "euclidean", "chebyshev", "cosine", "similarity")
#: how the kernel weights of an anchor are normalised: per anchor (Eq. 2) or over the batch
#: (the official code's Σ_{i,k} w_ik·(−log p_ik) / Σ_{i,k} w_ik)
WEIGHT_NORMS = ("anchor", "global")
KERNELS = ("rbf", "gaussian", "cauchy")
#: the registered loss names (one contrastive method each)
LOSSES = ("adapn", "exponential", "threshold", "yaware", "rnc", "simclr", "nnclr")
_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def kernel_weights(y_a: Tensor, y_b: Tensor, kernel: str = "rbf", sigma: float = 1.0) -> Tensor:
    """w [A, B] = K(y_a[i] − y_b[k]): rbf exp(−Δ²/(2σ²)); gaussian the same / (√(2π)·σ);
    cauchy 1 / (σ·Δ² + 1) (σ is the Cauchy γ, as in the official code)."""
    if not sigma > 0:
        raise ValueError(f"kernel width sigma must be > 0, got {sigma}")
    diff = y_a.reshape(-1, 1) - y_b.reshape(1, -1)
    if kernel == "rbf":
        return torch.exp(-(diff ** 2) / (2.0 * sigma ** 2))
    if kernel == "gaussian":
        return torch.exp(-(diff ** 2) / (2.0 * sigma ** 2)) / (math.sqrt(2.0 * math.pi) * sigma)
    if kernel == "cauchy":
        return 1.0 / (sigma * diff ** 2 + 1.0)
    raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def pairwise_distance(a: Tensor, b: Tensor, distance: str = "manhattan") -> Tensor:
    """d [A, B] between the rows of a [A, d] and b [B, d] (computed entry by entry, so a row
    of anchors gets the same numbers whatever else is in the batch)."""
    if distance == "manhattan":
        return torch.cdist(a, b, p=1.0)
    if distance == "euclidean":
        return torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    if distance == "chebyshev":
        return torch.cdist(a, b, p=float("inf"))
    if distance == "cosine":
        return 1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    if distance == "similarity":
        # the official code's NN_nb_selection="similarity": top-k of the dot product; on unit
        # projections the same order as cosine and euclidean
        return -(a @ b.T)
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


def _anchor_index(anchors: Optional[Tensor], n: int, device: torch.device) -> Tensor:
    if anchors is None:
        return torch.arange(n, device=device)
    idx = torch.as_tensor(anchors, device=device).reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"anchor indices must lie in [0, {n}), got {idx.tolist()[:8]}")
    return idx


def _self_mask(idx: Tensor, n: int) -> Tensor:
    """[A, N] bool, True at (a, idx[a])."""
    mask = torch.zeros(idx.numel(), n, dtype=torch.bool, device=idx.device)
    mask[torch.arange(idx.numel(), device=idx.device), idx] = True
    return mask


def nearest_neighbour_mask(z: Tensor, nn_nb: int, distance: str = "manhattan",
                           anchors: Optional[Tensor] = None) -> Tensor:
    """[A, N] bool: the ``nn_nb`` samples nearest to each anchor under ``distance``, the
    anchor itself excluded (every other sample when nn_nb ≥ N − 1). No gradient."""
    n = z.shape[0]
    idx = _anchor_index(anchors, n, z.device)
    own = _self_mask(idx, n)
    nn_nb = int(nn_nb)
    if nn_nb < 1:
        raise ValueError(f"nn_nb must be >= 1, got {nn_nb}")
    if nn_nb >= n - 1:
        return ~own
    with torch.no_grad():
        zd = z.detach()
        d = pairwise_distance(zd[idx], zd, distance).masked_fill(own, float("inf"))
        nearest = torch.topk(d, nn_nb, dim=1, largest=False, sorted=True).indices
    mask = torch.zeros_like(own)
    mask.scatter_(1, nearest, True)
    return mask


def _check(z: Tensor, y: Optional[Tensor], temperature: float, reduction: str) -> None:
    if z.dim() != 2:
        raise ValueError(f"z must be [N, d], got shape {tuple(z.shape)}")
    if z.shape[0] < 2:
        raise ValueError(f"a contrastive loss needs at least 2 samples, got {z.shape[0]}")
    if y is not None and y.numel() != z.shape[0]:
        raise ValueError(f"{y.numel()} labels for {z.shape[0]} embeddings")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(terms: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    return terms


def _similarities(z: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """s [A, N] = z[idx]·zᵀ / τ, in at least float32."""
    acc = torch.promote_types(z.dtype, torch.float32)
    zf = z.to(acc)
    return zf[idx] @ zf.T / float(temperature)


def _positive_weights(y: Tensor, idx: Tensor, kernel: str, sigma: float,
                      own: Tensor, dtype: torch.dtype,
                      weight_norm: str = "anchor") -> tuple[Tensor, Tensor]:
    """(w [A, N], ŵ [A, N]): kernel weights and their normalisation, ŵ = 0 on the diagonal.

    ``anchor`` (Eq. 2): ŵ_ik = w_ik / Σ_{t≠i} w_it (rows without any weight give l_i = 0).
    ``global`` (the official code): ŵ_ik = N·w_ik / Σ_{j, t≠j} w_jt over ALL N rows, so that the
    mean over anchors of l_i is Σ_{i,k} w_ik·(−log p_ik) / Σ_{i,k} w_ik whichever anchors a
    process owns (the total needs only the labels, which every rank has).
    """
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {', '.join(WEIGHT_NORMS)}, got {weight_norm!r}")
    yf = y.detach().reshape(-1).to(dtype)
    w = kernel_weights(yf[idx], yf, kernel, float(sigma))
    w_off = w.masked_fill(own, 0.0)
    tiny = torch.finfo(dtype).tiny
    if weight_norm == "global":
        n = yf.numel()
        w_all = kernel_weights(yf, yf, kernel, float(sigma))
        total = w_all.sum() - w_all.diagonal().sum()
        return w, w_off * (n / total.clamp_min(tiny))
    w_hat = w_off / w_off.sum(dim=1, keepdim=True).clamp_min(tiny)
    return w, w_hat


def _weighted_nll(s: Tensor, log_den: Tensor, w_hat: Tensor) -> Tensor:
    """l_i = −Σ_k ŵ_ik (s_ik − log_den_ik) (log_den [A, 1] or [A, N]); ŵ_ii = 0."""
    log_prob = s - log_den
    return -(w_hat * log_prob.masked_fill(w_hat == 0, 0.0)).sum(dim=1)


def _exclusive_prefix_lse(values_sorted: Tensor) -> Tensor:
    """P [A, M+1]: P[:, j] = log Σ_{m<j} exp(values_sorted[:, m]) (P[:, 0] = −inf)."""
    head = torch.full_like(values_sorted[:, :1], float("-inf"))
    return torch.cat([head, torch.logcumsumexp(values_sorted, dim=1)], dim=1)


# ---------------------------------------------------------------------------------------------
# The kernel family: AdapN, Exponential, Y-Aware, Threshold
# ---------------------------------------------------------------------------------------------
def adapn_loss(z: Tensor, y: Tensor, nn_nb: int, *, sigma: float, temperature: float,
               distance: str = "manhattan", kernel: str = "rbf",
               far_lambda: Optional[float] = None, max_shift: bool = False,
               weight_norm: str = "anchor", anchors: Optional[Tensor] = None,
               reduction: str = "mean") -> Tensor:
    """AdapN (DESIGN.md): mean over anchors of
    l_i = −Σ_{k≠i} ŵ_ik·(s_ik − log Σ_{t∈NN(i)} exp(s_it·(1 − w_it))).

    z [N, d] L2-normalised projections (views stacked), y [N] labels, nn_nb the neighbourhood
    size (the anchor excluded; all others when ≥ N − 1). far_lambda (appendix A.1): None drops
    the non-nearest samples; a λ ≥ 0 keeps them with weight (r_i/d_it)^λ, r_i the distance of
    i's farthest nearest neighbour. max_shift: reproduce the official code (AdapN's and
    Barbano's), which replaces s by s − max_t s_it (row max over all samples, the anchor
    included, no gradient) before multiplying by (1 − w): NOT a constant shift, it weights each
    denominator term by exp(−max_t s_it·(1 − w_it)) (docs/adapn.md). Off by default (Eq. 2).
    weight_norm: ``anchor`` (Eq. 2) or ``global`` (the official code; see `_positive_weights`).
    anchors/reduction: see the module docstring.
    """
    _check(z, y, temperature, reduction)
    n = z.shape[0]
    idx = _anchor_index(anchors, n, z.device)
    own = _self_mask(idx, n)
    s = _similarities(z, idx, temperature)
    if max_shift:
        s = s - s.detach().amax(dim=1, keepdim=True)
    w, w_hat = _positive_weights(y, idx, kernel, sigma, own, s.dtype, weight_norm)
    neighbours = nearest_neighbour_mask(z, nn_nb, distance, idx)
    logits = s * (1.0 - w)
    if far_lambda is None or bool(neighbours.sum(dim=1).eq(n - 1).all()):
        log_den = torch.logsumexp(logits.masked_fill(~neighbours, float("-inf")), dim=1,
                                  keepdim=True)
    else:
        lam = float(far_lambda)
        if lam < 0:
            raise ValueError(f"far_lambda must be >= 0, got {far_lambda}")
        with torch.no_grad():
            d = pairwise_distance(z.detach()[idx].to(s.dtype), z.detach().to(s.dtype), distance)
            radius = d.masked_fill(~neighbours, float("-inf")).amax(dim=1, keepdim=True)
            tiny = torch.finfo(s.dtype).tiny
            # log ν = λ·log(r/d) for non-nearest samples, 0 for neighbours, −inf for the anchor
            log_nu = lam * (torch.log(radius.clamp_min(tiny)) - torch.log(d.clamp_min(tiny)))
            log_nu = torch.where(neighbours, torch.zeros_like(log_nu), log_nu.clamp_max(0.0))
            log_nu = log_nu.masked_fill(own, float("-inf"))
        log_den = torch.logsumexp(logits + log_nu, dim=1, keepdim=True)
    return _reduce(_weighted_nll(s, log_den, w_hat), reduction)


def exponential_loss(z: Tensor, y: Tensor, *, sigma: float, temperature: float,
                     kernel: str = "rbf", max_shift: bool = False, weight_norm: str = "anchor",
                     anchors: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Exponential: l_i = −Σ_{k≠i} ŵ_ik·(s_ik − log Σ_{t≠i} exp(s_it·(1 − w_it)))
    (max_shift, weight_norm: as in `adapn_loss`)."""
    return adapn_loss(z, y, max(z.shape[0] - 1, 1), sigma=sigma, temperature=temperature,
                      kernel=kernel, max_shift=max_shift, weight_norm=weight_norm,
                      anchors=anchors, reduction=reduction)


def yaware_loss(z: Tensor, y: Tensor, *, sigma: float, temperature: float,
                kernel: str = "rbf", weight_norm: str = "anchor",
                anchors: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Y-Aware: l_i = −Σ_{k≠i} ŵ_ik·(s_ik − log Σ_{t≠i} exp(s_it))."""
    _check(z, y, temperature, reduction)
    n = z.shape[0]
    idx = _anchor_index(anchors, n, z.device)
    own = _self_mask(idx, n)
    s = _similarities(z, idx, temperature)
    _, w_hat = _positive_weights(y, idx, kernel, sigma, own, s.dtype, weight_norm)
    log_den = torch.logsumexp(s.masked_fill(own, float("-inf")), dim=1, keepdim=True)
    return _reduce(_weighted_nll(s, log_den, w_hat), reduction)


def threshold_loss(z: Tensor, y: Tensor, *, sigma: float, temperature: float,
                   kernel: str = "rbf", weight_norm: str = "anchor",
                   anchors: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Threshold: l_i = −Σ_{k≠i} ŵ_ik·(s_ik − log(exp(s_ik) + Σ_{t≠i: w_it < w_ik} exp(s_it))).

    Per anchor the samples are sorted by w; the denominator of the pair (i, k) is the positive
    plus a prefix (strictly smaller weights) of that order, read from a prefix log-sum-exp:
    O(A·N log N) time and O(A·N) memory.
    """
    _check(z, y, temperature, reduction)
    n = z.shape[0]
    idx = _anchor_index(anchors, n, z.device)
    own = _self_mask(idx, n)
    s = _similarities(z, idx, temperature)
    w, w_hat = _positive_weights(y, idx, kernel, sigma, own, s.dtype, weight_norm)
    key = w.masked_fill(own, float("inf"))          # the anchor sorts last, never "<" anything
    key_sorted, order = torch.sort(key, dim=1)
    prefix = _exclusive_prefix_lse(s.gather(1, order))
    n_less = torch.searchsorted(key_sorted.contiguous(), w.contiguous(), right=False)
    log_den = torch.logaddexp(s, prefix.gather(1, n_less))
    return _reduce(_weighted_nll(s, log_den, w_hat), reduction)


# ---------------------------------------------------------------------------------------------
# Rank-N-Contrast, SimCLR, NNCLR
# ---------------------------------------------------------------------------------------------
RNC_SIMILARITIES = ("dot", "neg_l2")


def rnc_loss(z: Tensor, y: Tensor, *, temperature: float, similarity: str = "dot",
             anchors: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Rank-N-Contrast: l_i = −1/(N−1)·Σ_{k≠i} (s_ik − log Σ_{t∈S_ik} exp(s_it)),
    S_ik = {t ≠ i : |y_i − y_t| ≥ |y_i − y_k|} (so k ∈ S_ik). O(A·N) memory
    (neg_l2: O(A·N·d)).

    similarity: ``dot`` s = z_i·z_k/τ (the family's, on unit projections), or ``neg_l2``
    s = −‖z_i − z_k‖₂/τ (the RnC paper and official code, on un-normalised encoder features
    with τ = 2)."""
    _check(z, y, temperature, reduction)
    if similarity not in RNC_SIMILARITIES:
        raise ValueError(f"rnc similarity must be one of {', '.join(RNC_SIMILARITIES)}, "
                         f"got {similarity!r}")
    n = z.shape[0]
    idx = _anchor_index(anchors, n, z.device)
    own = _self_mask(idx, n)
    if similarity == "dot":
        s = _similarities(z, idx, temperature)
    else:
        zf = z.to(torch.promote_types(z.dtype, torch.float32))
        diff = zf[idx].unsqueeze(1) - zf.unsqueeze(0)               # [A, N, d]
        # the norm's gradient at 0 (the anchor itself, masked below) would be NaN: add a tiny
        # floor inside the square root; it changes no distance above 1e-6
        s = -torch.sqrt((diff ** 2).sum(-1) + 1e-12) / float(temperature)
    yf = y.detach().reshape(-1).to(s.dtype)
    neg_gap = -(yf[idx].reshape(-1, 1) - yf.reshape(1, -1)).abs()   # −|y_i − y_t|
    key = neg_gap.masked_fill(own, float("inf"))                     # the anchor sorts last
    key_sorted, order = torch.sort(key, dim=1)       # farthest label first
    prefix = _exclusive_prefix_lse(s.gather(1, order))
    # |S_ik| = #{t ≠ i : −|y_i − y_t| ≤ −|y_i − y_k|} ≥ 1 (k itself)
    n_far = torch.searchsorted(key_sorted.contiguous(), neg_gap.contiguous(), right=True)
    log_den = prefix.gather(1, n_far)
    w_hat = (~own).to(s.dtype) / float(n - 1)
    return _reduce(_weighted_nll(s, log_den, w_hat), reduction)


def simclr_loss(z: Tensor, ids: Tensor, *, temperature: float,
                anchors: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """SimCLR / NT-Xent over samples whose ``ids`` (e.g. scan indices, one per view) mark the
    positives: l_i = −1/|P(i)|·Σ_{p∈P(i)} (s_ip − log Σ_{t≠i} exp(s_it))."""
    _check(z, ids, temperature, reduction)
    n = z.shape[0]
    idx = _anchor_index(anchors, n, z.device)
    own = _self_mask(idx, n)
    s = _similarities(z, idx, temperature)
    ids = ids.detach().reshape(-1)
    positive = (ids[idx].reshape(-1, 1) == ids.reshape(1, -1)) & ~own
    pos = positive.to(s.dtype)
    w_hat = pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)
    log_den = torch.logsumexp(s.masked_fill(own, float("-inf")), dim=1, keepdim=True)
    return _reduce(_weighted_nll(s, log_den, w_hat), reduction)


def nnclr_loss(z1: Tensor, z2: Tensor, support: Optional[Tensor], *, temperature: float,
               support_ids: Optional[Tensor] = None, ids: Optional[Tensor] = None,
               anchors: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """NNCLR, symmetrised: for anchor i, q1_i = the support vector most similar (dot product)
    to z1_i (no gradient),

        l_i = ½·[−log softmax_k(q1_i·z2_k/τ)[i] − log softmax_k(q2_i·z1_k/τ)[i]].

    support [M, d] (a queue of earlier view-1 projections); None or empty: q = z (SimCLR's
    two-view cross-entropy). z1, z2 [N, d], row i of both views of the same scan. With
    ``support_ids`` [M] and ``ids`` [N] (scan ids), a support row of the anchor's own scan is
    never its neighbour (an anchor with no other candidate keeps its own view).
    """
    if z1.shape != z2.shape:
        raise ValueError(f"the two views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    # the samples are the 2N views, as for every other loss here: one scan (a validation set's
    # last batch) is two samples, its loss log 1 = 0 as SimCLR's is
    _check(torch.cat([z1, z2]), None, temperature, reduction)
    n = z1.shape[0]
    idx = _anchor_index(anchors, n, z1.device)
    acc = torch.promote_types(z1.dtype, torch.float32)
    a1, a2 = z1.to(acc), z2.to(acc)
    exclude = support_ids is not None and ids is not None

    def neighbour(q: Tensor) -> Tensor:
        if support is None or support.numel() == 0:
            return q.detach()
        bank = support.detach().to(acc)
        similarity = q.detach() @ bank.T                                # [A, M]
        if exclude:
            own = ids.reshape(-1)[idx].reshape(-1, 1) == support_ids.reshape(1, -1)
            similarity = similarity.masked_fill(own, float("-inf"))
            best = bank[similarity.argmax(dim=1)]
            return torch.where(own.all(dim=1, keepdim=True), q.detach(), best)
        return bank[similarity.argmax(dim=1)]

    terms = []
    for anchor_view, other_view in ((a1, a2), (a2, a1)):
        q = neighbour(anchor_view[idx])
        logits = q @ other_view.T / float(temperature)             # [A, N]
        terms.append(F.cross_entropy(logits, idx, reduction="none"))
    return _reduce(0.5 * (terms[0] + terms[1]), reduction)
