"""Issue 27's end to end: a store on the 2 mm MNI152 box trains LSOR and AdapN with
`METHOD.yaml + smoke.yaml + data.store=BOX.zarr` and nothing else (the input follows the store),
and the registered models apply to new NIfTI files on that box (`embed`, `predict-age`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcbrain.data.preprocess import load_scan
from hpcbrain.data.store import CohortStore
from hpcbrain.volume_grid import MNI_BOXES

pytestmark = [pytest.mark.slow, pytest.mark.minutes]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def box_cohort(tmp_path_factory):
    """6 synthetic subjects (registered preset: MNI152 world coordinates) on the mni2mm box."""
    from hpcbrain.data.convert import convert_cohort
    from hpcbrain.data.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("box")
    synthesize_cohort(root / "bids", 6, seed=11, progress=False)
    convert_cohort(root / "bids", root / "box.zarr", MNI_BOXES["mni2mm"], workers=2,
                   progress=False, qc_report=False)
    return root


def train(method: str, root: Path, name: str) -> None:
    subprocess.run([sys.executable, "-m", "hpcbrain.cli", "train", "--cfg", f"{method}.yaml",
                    "--cfg", "smoke.yaml", f"data.store={root / 'box.zarr'}",
                    f"run.root={root / 'runs'}", f"run.name={name}",
                    f"tracking.uri=sqlite:///{root / 'mlflow.db'}"], check=True, cwd=ROOT)


@pytest.mark.parametrize("method", ["lsor", "adapn"])
def test_a_box_store_trains_and_its_models_embed_new_scans_on_the_box(box_cohort, method,
                                                                         monkeypatch):
    import mlflow

    from hpcbrain.evaluate.age_predictor import predict_ages
    from hpcbrain.evaluate.embed import embed_scans, load_registered

    root = box_cohort
    train(method, root, method)
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(root / "runs" / method / "config.yaml")
    assert OmegaConf.to_object(recorded.data.input_size) == [80, 96, 80]   # from the store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    store = CohortStore(root / "box.zarr")
    scans = [str(p) for p in store.metadata["source_path"][:3]]
    encoder_uri = f"models:/hpcbrain-{method}-encoder@current"
    embedding = embed_scans(encoder_uri, scans)
    # what the encoder gives the store's own volumes of those scans (stored as float16)
    module, _, preparation = load_registered(encoder_uri)
    assert preparation.grid == MNI_BOXES["mni2mm"]
    fresh = np.stack([load_scan(s, preparation.grid)[0] for s in scans])
    stored = np.stack([store.read_image(i) for i in range(3)])
    np.testing.assert_allclose(fresh, stored, atol=2e-3)      # float16's rounding
    with torch.no_grad():
        expected = module(torch.from_numpy(stored.astype(np.float32))[:, None]).numpy()
    np.testing.assert_allclose(embedding.latents, expected, rtol=1e-2, atol=1e-2)
    if method == "lsor":
        assert embedding.grid == (2, 2)
    else:
        ages, _ = predict_ages(f"models:/hpcbrain-{method}-age@current", scans)
        assert ages.shape == (3,) and np.isfinite(ages).all()
