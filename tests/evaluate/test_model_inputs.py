"""What a registered model says about its inputs, and what embed/predict-age do with it."""
from __future__ import annotations

import pytest

from hpcbrain.data.preprocess import PREPROCESSING, PREPROCESSING_VERSION
from hpcbrain.evaluate.model_inputs import ModelInputError, required_preparation


def model_dir(folder, preprocessing=None, shape=(16, 16, 16)):
    """A model folder with just its MLmodel file, metadata as a training run writes it (none:
    a model logged before models carried their inputs)."""
    from mlflow.models import Model

    metadata = None if preprocessing is None else {
        "hpcbrain": {"inputs": {"shape": list(shape), "preprocessing": preprocessing}}}
    folder.mkdir(parents=True)
    Model(metadata=metadata).save(str(folder / "MLmodel"))
    return folder


REGISTERED = {**PREPROCESSING, "registration": {"tool": "ANTsPy 0.6.3", "template": "MNI152"}}


def test_unregistered_and_old_models_need_the_plain_preparation(tmp_path):
    unregistered = model_dir(tmp_path / "new", {**PREPROCESSING, "registration": None})
    assert not required_preparation(unregistered, 16).register
    plain = required_preparation(model_dir(tmp_path / "old"), 16)    # no hpcbrain metadata
    assert (plain.grid.shape, plain.grid.fixed, plain.register, plain.preprocessing_version) \
        == ((16, 16, 16), False, False, PREPROCESSING_VERSION)


def test_a_registered_model_registers_new_scans(tmp_path):
    pytest.importorskip("ants")
    assert required_preparation(model_dir(tmp_path / "m", REGISTERED), 16).register


def test_what_cannot_be_prepared_here_is_refused_with_the_reason(tmp_path, request):
    with pytest.raises(ModelInputError, match="preprocessing version 99"):
        required_preparation(model_dir(tmp_path / "a", {**PREPROCESSING, "version": 99}), 16)
    with pytest.raises(ModelInputError, match="inconsistent"):
        required_preparation(model_dir(tmp_path / "b", PREPROCESSING, shape=(32, 32, 32)), 16)

    request.getfixturevalue("without_antspy")            # from here on, no ANTsPy
    with pytest.raises(ModelInputError, match="registered to MNI152.*pip install antspyx"):
        required_preparation(model_dir(tmp_path / "c", REGISTERED), 16)
