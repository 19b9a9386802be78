"""Embed new scans with a registered encoder: `hpcbrain embed MODEL_URI SCAN... --out FILE`.

Scans are preprocessed exactly as the converter preprocesses a cohort (`load_scan`), so a model
trained on a store sees new NIfTI files the way it saw its training data.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np


def model_input_size(model_uri: str) -> int:
    """S of the S³ volumes the logged encoder expects, read from its signature."""
    from mlflow.models import get_model_info

    inputs = get_model_info(model_uri).signature.inputs.to_dict()
    shape = inputs[0]["tensor-spec"]["shape"]
    return int(shape[-1])


def embed_scans(model_uri: str, scans: Sequence[str | Path], batch_size: int = 8) -> np.ndarray:
    """(len(scans), D) latents of the NIfTI files `scans`."""
    import mlflow.pytorch
    import torch

    from hpcbrain.data.convert import BadScanError, load_scan

    size = model_input_size(model_uri)
    encoder = mlflow.pytorch.load_model(model_uri)
    latents = []
    for start in range(0, len(scans), batch_size):
        volumes = []
        for path in scans[start:start + batch_size]:
            try:
                volumes.append(load_scan(path, size)[0])
            except BadScanError as exc:
                raise BadScanError(f"{path}: {exc}") from None
        with torch.no_grad():
            batch = torch.from_numpy(np.stack(volumes))[:, None]
            latents.append(encoder(batch).numpy())
    return np.concatenate(latents)


def write_latents(path: Path, scans: Sequence[str | Path], latents: np.ndarray) -> Path:
    """CSV (path, z0, z1, ...) or .npy by the file's suffix; written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as handle:
            np.save(handle, latents)
    else:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", *(f"z{k}" for k in range(latents.shape[1]))])
            for scan, row in zip(scans, latents):
                writer.writerow([str(scan), *(f"{v:.6g}" for v in row)])
    tmp.replace(path)
    return path
