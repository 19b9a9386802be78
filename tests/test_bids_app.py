"""`hpcbrain bids-app`: a trained, registered LSOR encoder applied to a BIDS dataset, written as
BIDS derivatives for exactly the participants asked for, then gathered at the group level."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import lsor_run_config
from kill_points import KILL_HOOKS
from sources import make_bids

from hpcbrain.cli import main
from hpcbrain.data.convert import convert_cohort
from hpcbrain.data.preprocess import load_scan
from hpcbrain.job import run_training

pytestmark = pytest.mark.slow


def train_on_bids(root, name: str, *extra: str):
    """A BIDS dataset of 4 participants × 2 sessions under `root`, its 16³ store, LSOR trained
    on it (`extra` overrides last) and registered as `NAME-encoder` in a local MLflow store:
    (the BIDS folder, the tracking URI, the training result)."""
    bids = make_bids(root / "bids", n_subjects=4, n_sessions=2, shape=(18, 16, 14))
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "phantoms", "BIDSVersion": "1.9.0", "Version": "1.0"}))
    store = convert_cohort(bids, root / "cohort.zarr", 16, progress=False).out
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = run_training(lsor_run_config(
        store, root / "runs", name, "tracking.enabled=true", f"tracking.uri={uri}",
        f"tracking.registered_model={name}-encoder", "train.epochs=2", "data.val_fraction=0",
        *extra))
    return bids, uri, result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LSOR (its test-sized 2 × 2 grid) trained and registered on a 4 × 2-scan BIDS dataset."""
    return train_on_bids(tmp_path_factory.mktemp("bids_app"), "app")


def test_participant_level_writes_derivatives_for_exactly_those_participants(trained,
                                                                            tmp_path):
    bids, uri, result = trained
    out = tmp_path / "derivatives"
    assert main(["bids-app", str(bids), str(out), "participant", "--model", result.model_uri,
                 "--tracking-uri", uri, "--participant-label", "02", "sub-04"]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = []
    for sub in ("sub-02", "sub-04"):
        for ses in ("ses-01", "ses-02"):
            for what in ("latent", "somnode", "similarity"):
                stem = f"{sub}/{ses}/anat/{sub}_{ses}_desc-hpcbrain_{what}"
                expected += [f"{stem}.json", f"{stem}.tsv"]
    assert written == sorted(["dataset_description.json", *expected])

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    (made_by,) = description["GeneratedBy"]
    assert made_by["Name"] == "hpcbrain" and made_by["Version"]
    assert result.model_uri in made_by["Description"]
    assert description["SourceDatasets"] == [{"URL": bids.resolve().as_uri(), "Version": "1.0"}]

    # the latent is the encoder's on the scan prepared as the store was
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(uri)
    encoder = mlflow.pytorch.load_model(result.model_uri)
    scan = bids / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_T1w.nii.gz"
    expected_z = encoder(torch.from_numpy(load_scan(scan, 16)[0])[None, None]).detach().numpy()
    stem = out / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_desc-hpcbrain"
    lines = (stem.parent / f"{stem.name}_latent.tsv").read_text().splitlines()
    assert lines[0].split("\t") == [f"z{k}" for k in range(expected_z.shape[1])]
    np.testing.assert_allclose([float(v) for v in lines[1].split("\t")], expected_z[0],
                               rtol=1e-4, atol=1e-4)
    rho = np.loadtxt(stem.parent / f"{stem.name}_similarity.tsv", skiprows=1, ndmin=2)
    assert rho.shape == (2, 2) and rho.sum() == pytest.approx(1.0, abs=1e-4)
    sidecar = json.loads((stem.parent / f"{stem.name}_latent.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz"]

    # a second participant's task adds to the same folder; the group level gathers them all
    assert main(["bids-app", str(bids), str(out), "participant", "--model", result.model_uri,
                 "--tracking-uri", uri, "--participant-label", "01",
                 "--session-label", "ses-02"]) == 0
    assert main(["bids-app", str(bids), str(out), "group"]) == 0
    table = (out / "group" / "latents.tsv").read_text().splitlines()
    assert [row.split("\t")[:2] for row in table[1:]] == [
        ["sub-01", "ses-02"], ["sub-02", "ses-01"], ["sub-02", "ses-02"],
        ["sub-04", "ses-01"], ["sub-04", "ses-02"]]
    assert (out / "group" / "somnodes.png").stat().st_size > 1000


def test_bad_requests_are_refused_by_name(trained, tmp_path, capsys):
    bids, uri, result = trained
    out = tmp_path / "d"
    assert main(["bids-app", str(bids), str(out), "participant", "--model", result.model_uri,
                 "--tracking-uri", uri, "--participant-label", "09"]) == 2
    assert "['sub-09']: no T1w images" in capsys.readouterr().err
    assert not out.exists()
    assert main(["bids-app", str(bids), str(out), "group"]) == 2
    assert "run the participant level first" in capsys.readouterr().err
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"GeneratedBy": [{"Name": "hpcbrain", "Description": "model models:/other@x"}]}))
    assert main(["bids-app", str(bids), str(out), "participant", "--model", result.model_uri,
                 "--tracking-uri", uri]) == 2
    assert "holds derivatives of ['model models:/other@x']" in capsys.readouterr().err


def test_a_full_output_disk_stops_naming_the_derivative_and_the_rerun_completes(trained,
                                                                               capsys):
    """The derivatives folder on a 1 MB tmpfs with 8 KB left: the participant level stops with
    one line naming the file it was writing (exit 74), leaves no half-written file, and the same
    command completes once space is freed."""
    from small_fs import fill, small_file_system

    from hpcbrain.disk_space import EXIT_NO_SPACE

    bids, uri, result = trained
    with small_file_system(1) as fs:
        out = fs / "derivatives"
        ballast = fill(fs, leave_bytes=8 * 1024)
        args = ["bids-app", str(bids), str(out), "participant", "--model", result.model_uri,
                "--tracking-uri", uri]
        assert main(args) == EXIT_NO_SPACE
        err = capsys.readouterr().err
        assert err.count("error: out of disk space writing a BIDS derivative") == 1, err
        assert str(out) in err and "Traceback" not in err
        assert not [p for p in out.rglob(".*tmp-*")]
        ballast.unlink()
        assert main(args) == 0
        assert len(list(out.rglob("*_latent.tsv"))) == 8      # 4 participants × 2 sessions


KILLED_BIDS_APP = r"""
import sys
kind, nth = sys.argv[1], int(sys.argv[2])
""" + KILL_HOOKS + r"""
from hpcbrain.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.minutes
def test_sigkill_at_seeded_points_then_the_same_command_writes_the_uninterrupted_derivatives(
        trained, tmp_path):
    """The participant level killed (SIGKILL) 10 times at seeded points — before an fsync or a
    rename of a derivative, its sidecar or dataset_description.json — then run again: the
    folder holds exactly the files of an uninterrupted run, byte for byte."""
    import random
    import signal
    import subprocess
    import sys

    bids, uri, result = trained

    def life(out, kind="none", nth=0):
        # every run a process of its own, the uninterrupted one too: the same torch threads
        return subprocess.run([sys.executable, "-c", KILLED_BIDS_APP, kind, str(nth),
                               "bids-app", str(bids), str(out), "participant",
                               "--model", result.model_uri, "--tracking-uri", uri],
                              capture_output=True, text=True, timeout=300)

    assert life(tmp_path / "straight").returncode == 0
    rng = random.Random(2614)
    killed = 0
    for _ in range(10):
        kind = rng.choice(["fsync", "replace"])
        ended = life(tmp_path / "killed", kind, rng.randint(1, 30))
        assert ended.returncode in (0, -signal.SIGKILL), ended.stderr[-2000:]
        killed += ended.returncode == -signal.SIGKILL
    assert killed >= 8
    final = life(tmp_path / "killed")
    assert final.returncode == 0, final.stderr[-2000:]

    def contents(folder):
        return {str(p.relative_to(folder)): p.read_bytes()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    expected, got = contents(tmp_path / "straight"), contents(tmp_path / "killed")
    assert got.keys() == expected.keys()        # no temporary or half-written file left
    for name in expected:
        assert got[name] == expected[name], name


@pytest.fixture(scope="module")
def trained_4x8(tmp_path_factory):
    """LSOR with the paper's 4 × 8 grid on the 4 × 2 scans of a BIDS dataset: at most 8 of its
    32 nodes can hold a scan."""
    return train_on_bids(tmp_path_factory.mktemp("bids_app_4x8"), "grid", "lsor.grid_rows=4",
                         "lsor.grid_cols=8", "lsor.init=longitudinal")


def test_group_outputs_show_the_models_grid_and_each_participants_path(trained_4x8, tmp_path):
    """Two participants (4 scans) of a 4 × 8 model: the counts table and figure are 4 × 8 —
    the model's grid from its som.npz, not the nodes occupied —, each participant's visits are
    listed in age order on their nodes, and the trajectory and similarity-by-age figures are
    drawn."""
    import mlflow

    from hpcbrain.evaluate.embed import load_registered, som_of

    bids, uri, result = trained_4x8
    out = tmp_path / "derivatives"
    assert main(["bids-app", str(bids), str(out), "participant", "--model", result.model_uri,
                 "--tracking-uri", uri, "--participant-label", "01", "03"]) == 0
    mlflow.set_tracking_uri(uri)
    assert som_of(load_registered(result.model_uri)[1])["grid"] == (4, 8)
    node_file = out / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_desc-hpcbrain_somnode.tsv"
    header, (cells,) = node_file.read_text().splitlines()[0].split("\t"), [
        line.split("\t") for line in node_file.read_text().splitlines()[1:]]
    assert header == ["som_row", "som_col", "som_rows", "som_cols", "age"]
    assert cells[2:4] == ["4", "8"]
    assert main(["bids-app", str(bids), str(out), "group"]) == 0

    counts = np.loadtxt(out / "group" / "somnode_counts.tsv", skiprows=1, ndmin=2)
    assert counts.shape == (4, 8) and counts.sum() == 4
    nodes = {}
    for path in sorted(out.glob("sub-*/ses-*/anat/*_somnode.tsv")):
        row = path.read_text().splitlines()[1].split("\t")
        nodes[path.name[:13]] = (f"({row[0]},{row[1]})", float(row[4]))
        assert counts[int(row[0]), int(row[1])] >= 1
    lines = (out / "group" / "som_trajectories.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["participant_id", "visits", "nodes", "ages"]
    for line in lines[1:]:
        participant, visits, path, ages = line.split("\t")
        visits_of = sorted((v for k, v in nodes.items() if k.startswith(participant)),
                           key=lambda v: v[1])                # age order
        assert visits == "2" and path == " → ".join(v[0] for v in visits_of)
        assert ages == ", ".join(f"{v[1]:g}" for v in visits_of)
    for name in ("somnodes.png", "som_trajectories.png", "som_similarity_by_age.png"):
        assert (out / "group" / name).stat().st_size > 1000, name
