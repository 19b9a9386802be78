"""Distance correlation (Székely, Rizzo & Bakirov 2007), the statistic LSOR reports for its grid."""
from __future__ import annotations

import numpy as np


def _centered_distances(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()


def distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """dCor(X, Y) in [0, 1]: 0 iff independent (in the population), 1 for similarity maps.

    x: (n,) or (n, p); y: (n,) or (n, q). The V-statistic (biased) form, as in the dcor package.
    """
    a, b = _centered_distances(x), _centered_distances(y)
    if len(a) != len(b):
        raise ValueError(f"x and y need the same number of samples, got {len(a)} and {len(b)}")
    dcov2_xy = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    if dvar2 <= 0:
        return 0.0
    return float(np.sqrt(max(dcov2_xy, 0.0) / np.sqrt(dvar2)))
