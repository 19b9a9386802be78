"""`hpcbrain convert --register`: N4 + affine registration to MNI152 with ANTsPy, on real NIfTI
files written here and read back."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hpcbrain.data.convert import ConversionError, convert_cohort
from hpcbrain.data.register import MIN_CORRELATION, similarity_to_template
from hpcbrain.data.store import CohortStore
from hpcbrain.data.synth import synthesize_cohort

pytestmark = pytest.mark.slow


def perturbed(data: np.ndarray, degrees: float, scale: float, shift_vox) -> np.ndarray:
    """`data` rotated about its centre (in the plane of axes 0, 1), scaled and shifted, all in
    voxel space (the affine stays the same: the head really moved and grew in the scanner)."""
    theta = np.deg2rad(degrees)
    forward = scale * np.array([[np.cos(theta), -np.sin(theta), 0],
                                [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    inverse = np.linalg.inv(forward)
    centre = np.array(data.shape) / 2
    offset = centre - inverse @ (centre + np.asarray(shift_vox, float))
    return ndimage.affine_transform(data, inverse, offset=offset, order=1, mode="constant",
                                    cval=float(data.min()))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A BIDS folder: one synthetic scan (sub-01), its perturbed twin (sub-02: 12°, ×1.08,
    shifted (3, −2, 4) voxels) and a scan of pure noise (sub-03)."""
    root = tmp_path_factory.mktemp("register")
    synthesize_cohort(root / "synth", 1, seed=3, progress=False)
    source = nib.load(sorted((root / "synth").glob("sub-*/ses-*/anat/*_T1w.nii.gz"))[0])
    data = source.get_fdata(dtype=np.float32)
    noise = np.random.default_rng(0).random(data.shape, dtype=np.float32) * float(data.max())
    bids = root / "bids"
    volumes = {"01": data, "02": perturbed(data, 12.0, 1.08, (3, -2, 4)), "03": noise}
    for label, volume in volumes.items():
        anat = bids / f"sub-{label}" / "ses-01" / "anat"
        anat.mkdir(parents=True)
        nib.save(nib.Nifti1Image(volume, source.affine), anat / f"sub-{label}_ses-01_T1w.nii.gz")
        (bids / f"sub-{label}" / f"sub-{label}_sessions.tsv").write_text(
            "session_id\tage\nses-01\t70\n")
    (bids / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\nsub-02\tF\nsub-03\tM\n")
    return bids


def correlation(store, i: int, j: int) -> float:
    return float(np.corrcoef(store.read_image(i).ravel(), store.read_image(j).ravel())[0, 1])


@pytest.mark.minutes
def test_registration_undoes_pose_and_size_and_rejects_what_does_not_register(twins, tmp_path):
    plain = CohortStore(convert_cohort(twins, tmp_path / "plain.zarr", 48, skip_bad=True,
                                       progress=False).out)
    assert correlation(plain, 0, 1) < 0.95                    # the pose difference is there

    report = convert_cohort(twins, tmp_path / "registered.zarr", 48, register=True,
                            skip_bad=True, workers=2, progress=False)
    registered = CohortStore(report.out)
    assert registered.metadata["subject"].tolist() == ["sub-01", "sub-02"]
    assert correlation(registered, 0, 1) >= 0.95
    (path, reason), = report.skipped                          # the noise is a bad scan
    assert "sub-03" in path and "registration to MNI152 looks wrong" in reason
    registration = registered.info["preprocessing"]["registration"]
    assert registration["tool"].startswith("ANTsPy") and "MNI152" in registration["template"]
    assert registration["min_correlation"] == MIN_CORRELATION
    assert plain.info["preprocessing"]["registration"] is None
    # the registered scans sit in the template's space: their affines are the template's
    np.testing.assert_allclose(registered.column("affine")[0], registered.column("affine")[1])


def test_similarity_to_template_is_pearson_over_the_brain():
    template = np.arange(8, dtype=float).reshape(2, 2, 2)
    brain = template > 1
    assert similarity_to_template(2 * template + 5, template, brain) == pytest.approx(1.0)
    assert similarity_to_template(-template, template, brain) == pytest.approx(-1.0)
    assert similarity_to_template(np.ones_like(template), template, brain) == 0.0


def test_without_antspy_the_converter_says_what_to_install(twins, tmp_path, without_antspy):
    with pytest.raises(ConversionError, match="pip install antspyx"):
        convert_cohort(twins, tmp_path / "x.zarr", 32, register=True, progress=False)
    assert not (tmp_path / "x.zarr").exists()
