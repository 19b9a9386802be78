"""Volumes on boxes, not only cubes: `--shape D H W` pads each field of view to the box's
aspect, `--grid mni2mm` samples every scan at the MNI152 brain box's world coordinates."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from sources import save

from hpcbrain.data.convert import ConversionError, convert_cohort
from hpcbrain.data.preprocess import BadScanError, load_scan
from hpcbrain.data.store import CohortStore
from hpcbrain.models.autoencoder import LSOREncoder, latent_shape
from hpcbrain.volume_grid import BRAIN_BOX_MM, MNI_BOXES, VolumeGrid, as_shape, grid_for


def test_shapes_and_grids_from_the_command_line():
    assert as_shape(32) == as_shape([32]) == (32, 32, 32)
    assert as_shape([80, 96, 80]) == (80, 96, 80)
    for bad in ([80, 96], [1, 8, 8], "big"):
        with pytest.raises(ValueError):
            as_shape(bad)
    assert grid_for([64]) == VolumeGrid((64, 64, 64))
    assert grid_for(None, "mni2mm") is MNI_BOXES["mni2mm"]
    assert grid_for([80, 96, 80], "mni2mm") is MNI_BOXES["mni2mm"]
    with pytest.raises(ValueError, match="leave --shape out"):
        grid_for([64], "mni2mm")
    with pytest.raises(ValueError, match="--grid"):
        grid_for(None, None)


def test_the_mni_boxes_hold_the_template_brain_and_divide_by_the_encoders_downsampling():
    from nilearn.datasets import load_mni152_template

    two, one = MNI_BOXES["mni2mm"], MNI_BOXES["mni1mm"]
    assert two.shape == (80, 96, 80) and one.shape == (160, 192, 160)
    assert all(side % 16 == 0 for side in two.shape + one.shape)
    # voxel (0, 0, 0)'s centre half a voxel inside the box's lower faces
    np.testing.assert_array_equal(two.affine() @ [0, 0, 0, 1], [-79, -112, -74, 1])
    np.testing.assert_array_equal(one.affine() @ [0, 0, 0, 1], [-79.5, -112.5, -74.5, 1])
    template = load_mni152_template(resolution=1)
    values = template.get_fdata()
    brain = np.argwhere(values > 0.2 * values.max())
    world = brain @ template.affine[:3, :3].T + template.affine[:3, 3]
    for axis, (lo, hi) in enumerate(BRAIN_BOX_MM):
        assert lo + 3 <= world[:, axis].min() and world[:, axis].max() <= hi - 3
    # a grid survives the store's attributes
    assert VolumeGrid.from_attrs(two.attrs(), [1, 1, 1]) == two
    assert VolumeGrid.from_attrs(None, [16, 16, 16]) == VolumeGrid((16, 16, 16))


def test_a_box_shape_pads_the_field_of_view_to_its_aspect(tmp_path):
    vol = np.zeros((16, 6, 8), np.float32)            # 16 × 6 × 8 mm at 1 mm
    vol[2:14, 1:5, 1:7] = np.random.default_rng(2).uniform(100, 200, (12, 4, 6))
    path = save(tmp_path / "a.nii.gz", vol)
    # box 16 × 8 × 8: x fills its side at 1 mm, y is padded by 1 mm each side, z fits
    got, _, voxel = load_scan(path, (16, 8, 8))
    fg = vol > 0
    mean, std = vol[fg].mean(dtype=np.float64), vol[fg].std(dtype=np.float64)
    expected = np.full((16, 8, 8), -mean / std, np.float32)
    expected[:, 1:7, :] = np.where(fg, (vol - mean) / std, -mean / std)
    assert voxel == 1.0
    np.testing.assert_allclose(got, expected, atol=1e-5)


def head_in_mni(affine_shift=(0.0, 0.0, 0.0), flip_x=False):
    """A 1 mm head of 100s over x −50…50, y −80…40, z −40…60 mm (MNI) with a 2 mm bright cube
    on world [10, 12) × [−13, −11) × [5, 7): exactly voxel (45, 50, 40) of the 2 mm box."""
    vol = np.zeros((100, 120, 100), np.float32)       # voxel i's centre at world −50 + i + 0.5
    vol[10:90, 10:110, 10:90] = 100.0
    vol[60:62, 67:69, 45:47] = 200.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = np.array([-49.5, -79.5, -39.5]) + affine_shift
    if flip_x:                                         # the same image stored LAS
        vol = vol[::-1].copy()
        affine = affine @ np.array([[-1, 0, 0, 99], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return nib.Nifti1Image(vol, affine)


def test_the_mni_box_samples_each_scan_at_world_coordinates(tmp_path):
    box = MNI_BOXES["mni2mm"]
    ras = load_scan(save(tmp_path / "ras.nii.gz", *_parts(head_in_mni())), box)[0]
    las = load_scan(save(tmp_path / "las.nii.gz", *_parts(head_in_mni(flip_x=True))), box)[0]
    assert ras.shape == box.shape
    assert np.unravel_index(np.argmax(ras), ras.shape) == (45, 50, 40)
    np.testing.assert_allclose(las, ras, atol=1e-5)  # orientation on disk does not matter
    # outside the head and outside the scan's field of view: the background level
    assert ras[0, 0, 0] == ras.min() and ras[2, 2, 2] == ras.min()


def test_a_scan_outside_mni_space_is_rejected_saying_what_to_do(tmp_path):
    away = save(tmp_path / "scanner.nii.gz", *_parts(head_in_mni(affine_shift=(0, 0, 300))))
    with pytest.raises(BadScanError, match="MNI152 space.*--register"):
        load_scan(away, MNI_BOXES["mni2mm"])
    load_scan(away, 16)                                  # a field-of-view grid takes it


def _parts(img):
    return np.asarray(img.dataobj), img.affine


def test_convert_on_the_mni_box_records_the_grid_for_training_and_models(tmp_path):
    from omegaconf import OmegaConf

    from hpcbrain.config import load_config
    from hpcbrain.data.store import StoreError
    from hpcbrain.job import open_store

    for k in range(2):
        save(tmp_path / f"s{k}.nii.gz", *_parts(head_in_mni(affine_shift=(k, 0, 0))))
    (tmp_path / "m.csv").write_text("path,subject,age\ns0.nii.gz,a,60\ns1.nii.gz,b,70\n")
    out = tmp_path / "box.zarr"
    with pytest.raises(ConversionError, match="every side ≥ 2"):
        convert_cohort(tmp_path / "m.csv", out, [80, 1, 80], progress=False)
    convert_cohort(tmp_path / "m.csv", out, MNI_BOXES["mni2mm"], progress=False)
    store = CohortStore(out)
    assert store.shape == (80, 96, 80) and store.grid == MNI_BOXES["mni2mm"]
    assert store.info["spacing_mm"] == [2.0, 2.0, 2.0]
    assert store.info["preprocessing"]["grid"]["name"] == "mni2mm"
    assert "mni2mm box" in store.info["preprocessing"]["field_of_view"]

    cfg = load_config(["lsor.yaml"], [f"data.store={out}"])
    assert cfg.data.input_size == "auto"
    open_store(cfg)                                      # the input follows the store
    assert OmegaConf.to_object(cfg.data.input_size) == [80, 96, 80]
    cfg = load_config(["lsor.yaml"], [f"data.store={out}", "data.input_size=64"])
    with pytest.raises(StoreError, match=r"data.input_size=64 but .* holds 80x96x80"):
        open_store(cfg)


def test_the_encoder_takes_boxes_whose_sides_divide_by_its_downsampling():
    import torch

    assert latent_shape([16, 32, 64, 16], (80, 96, 80)) == (16, 5, 6, 5)
    encoder = LSOREncoder([4, 8, 8, 4], (80, 96, 80))
    assert encoder(torch.zeros(2, 1, 80, 96, 80)).shape == (2, 4 * 5 * 6 * 5)
    with pytest.raises(ValueError, match="every side must be a positive multiple of"):
        latent_shape([4, 4, 4, 4], (80, 90, 80))
    with pytest.raises(ValueError, match=r"expected volumes of shape \[B, 1, 80, 96, 80\]"):
        encoder(torch.zeros(1, 1, 64, 64, 64))
