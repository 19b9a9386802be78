"""Embed new scans with a registered encoder: `hpcbrain embed MODEL_URI SCAN... --out FILE`.

Scans are preprocessed exactly as the converter preprocessed the model's training store
(`load_scan`, registered to MNI152 when the store was: the model carries how, see
`model_inputs.py`), so a model sees new NIfTI files the way it saw its training data.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcbrain.atomic import atomic_write
from hpcbrain.methods.lsor import SOM_FILE


def model_input_shape(model_uri: str) -> tuple[int, int, int]:
    """(D, H, W) of the volumes the logged encoder expects, read from its signature."""
    from mlflow.models import get_model_info

    inputs = get_model_info(model_uri).signature.inputs.to_dict()
    shape = inputs[0]["tensor-spec"]["shape"]
    return tuple(int(s) for s in shape[-3:])  # type: ignore[return-value]


@dataclass
class Embedding:
    """What `embed_scans` returns: latents [N, D] and, for a model that carries a SOM grid
    (LSOR), each scan's best-matching node (row, col) and its similarity grid ρ [N, Nr·Nc]."""

    latents: np.ndarray
    grid: tuple[int, int] | None = None
    som_row: np.ndarray | None = None
    som_col: np.ndarray | None = None
    similarity: np.ndarray | None = None


def som_of(model_dir: Path) -> dict | None:
    """The SOM a logged model carries (LSOR: nodes and grid), or None."""
    path = model_dir / "extra_files" / SOM_FILE
    if not path.is_file():
        return None
    with np.load(path) as som:
        return {"nodes": som["nodes"], "grid": tuple(int(v) for v in som["grid"])}


def load_registered(model_uri: str):
    """(torch module, its downloaded model folder, the `Preparation` of its inputs) of a logged
    model; `model_inputs.ModelInputError` before anything is loaded when new scans cannot be
    prepared for it here."""
    import mlflow.artifacts
    import mlflow.pytorch

    from hpcbrain.evaluate.model_inputs import required_preparation

    shape = model_input_shape(model_uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    preparation = required_preparation(model_dir, shape)
    return mlflow.pytorch.load_model(str(model_dir)), model_dir, preparation


def apply_to_scans(module, scans: Sequence[str | Path], preparation,
                   batch_size: int = 8) -> np.ndarray:
    """`module` on the NIfTI files `scans`, prepared as `preparation` says (`load_scan`), in
    batches; its outputs concatenated along the first axis. A bad file raises BadScanError
    naming it."""
    import torch

    from hpcbrain.data.preprocess import BadScanError, load_scan

    outputs = []
    for start in range(0, len(scans), batch_size):
        volumes = []
        for path in scans[start:start + batch_size]:
            try:
                volumes.append(load_scan(path, preparation.grid,
                                         register=preparation.register)[0])
            except BadScanError as exc:
                raise BadScanError(f"{path}: {exc}") from None
        with torch.no_grad():
            outputs.append(module(torch.from_numpy(np.stack(volumes))[:, None]).numpy())
    return np.concatenate(outputs)


def embed_scans(model_uri: str, scans: Sequence[str | Path], batch_size: int = 8) -> Embedding:
    """Latents of the NIfTI files `scans` (and their SOM nodes when the model has a grid)."""
    import torch

    from hpcbrain.methods.som import similarity_grid, squared_distances

    encoder, model_dir, preparation = load_registered(model_uri)
    result = Embedding(apply_to_scans(encoder, scans, preparation, batch_size))
    som = som_of(model_dir)
    if som is not None:
        z = torch.from_numpy(result.latents).to(torch.float64)
        nodes = torch.from_numpy(som["nodes"]).to(torch.float64)
        bmu = squared_distances(z, nodes).argmin(dim=1).numpy()
        result.grid = som["grid"]
        result.som_row, result.som_col = np.divmod(bmu, som["grid"][1])
        result.similarity = similarity_grid(z, nodes).numpy()
    return result


def write_latents(path: Path, scans: Sequence[str | Path], embedding: Embedding,
                  similarity: bool = False) -> Path:
    """CSV or .npy by the file's suffix; written atomically.

    CSV columns: path, z0…z{D-1}; with a SOM grid som_row, som_col (row-major grid, the
    best-matching node), som_rows, som_cols (the model's grid shape, whatever nodes the scans
    occupy) and, with `similarity`, rho_<row>_<col> for every node. A .npy holds the latents
    only."""
    path = Path(path)
    latents = embedding.latents
    if similarity and embedding.similarity is None:
        raise ValueError("--similarity needs a model with a SOM grid (an LSOR encoder); this "
                         "model has none")
    if path.suffix == ".npy":
        with atomic_write(path, "wb") as handle:
            np.save(handle, latents)
    else:
        header = ["path", *(f"z{k}" for k in range(latents.shape[1]))]
        has_som = embedding.grid is not None
        if has_som:
            header += ["som_row", "som_col", "som_rows", "som_cols"]
            rows, cols = embedding.grid
            if similarity:
                header += [f"rho_{r}_{c}" for r in range(rows) for c in range(cols)]
        with atomic_write(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for i, (scan, row) in enumerate(zip(scans, latents)):
                cells = [str(scan), *(f"{v:.6g}" for v in row)]
                if has_som:
                    cells += [int(embedding.som_row[i]), int(embedding.som_col[i]), rows, cols]
                    if similarity:
                        cells += [f"{v:.6g}" for v in embedding.similarity[i]]
                writer.writerow(cells)
    return path
