"""Configs: files merged in order, overrides last, each error names key, source and valid keys."""
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hpcbrain.config import ConfigError, flatten_config, load_config, save_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_files():
    cfg = load_config()
    assert cfg.method == "lsor"
    assert cfg.train.epochs == 50
    assert (cfg.lsor.grid_rows, cfg.lsor.grid_cols) == ("auto", "auto")   # sized at training


def test_files_merge_in_order_then_overrides(tmp_path):
    first = write(tmp_path / "a.yaml", "train:\n  epochs: 17\n  lr: 0.1\n")
    second = write(tmp_path / "b.yaml", "train:\n  epochs: 19\n")
    cfg = load_config([first, second], ["train.lr=0.5", "data.store=/x/y.zarr"])
    assert cfg.train.epochs == 19         # the later file wins
    assert cfg.train.lr == 0.5            # overrides beat files
    assert cfg.data.store == "/x/y.zarr"
    assert cfg.train.batch_size == 64     # untouched keys keep the schema default


def test_override_value_is_converted_to_schema_type():
    cfg = load_config(overrides=["train.epochs=13"])
    assert cfg.train.epochs == 13 and isinstance(cfg.train.epochs, int)


def test_bare_name_resolves_under_configs_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["lsor.yaml"])
    assert cfg.method == "lsor" and cfg.lsor.lambda_dir == 0.2


def test_unknown_key_in_file_names_file_key_and_valid_keys(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config([bad])
    message = str(err.value)
    assert str(bad) in message and "train.epoch" in message
    assert "epochs" in message and "batch_size" in message


def test_unknown_top_level_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*method.*train"):
        load_config([bad])


def test_wrong_type_in_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: bad value for 'train.epochs'"):
        load_config([bad])


def test_unknown_key_in_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'data.augment.flp=1': unknown key "
                                          r"'data.augment.flp'.*flip"):
        load_config(overrides=["data.augment.flp=1"])


def test_wrong_type_in_override():
    with pytest.raises(ConfigError, match=r"override 'train.lr=fast'"):
        load_config(overrides=["train.lr=fast"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(overrides=["train.epochs"])


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_config(["nope.yaml"])


def test_file_that_is_not_a_mapping(tmp_path):
    bad = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([bad])


def test_saved_config_reloads_to_the_same_values(tmp_path):
    cfg = load_config(["lsor.yaml"], ["train.epochs=4", "lsor.warmup_epochs=1"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config([path])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_flatten_config_gives_dotted_keys():
    flat = flatten_config(load_config(overrides=["train.epochs=12"]))
    assert flat["train.epochs"] == 12
    assert flat["data.augment.flip"] is True
    assert flat["model.widths"] == [16, 32, 64, 16]


def test_override_whose_value_is_not_yaml():
    with pytest.raises(ConfigError, match=r"override 'slurm.setup=\[export A=\$\{B\}\]'.*YAML"):
        load_config(overrides=["slurm.setup=[export A=${B}]"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=-0.001", "'train.lr': -0.001; it must be > 0"),
    ("train.batch_size=0", "'train.batch_size': 0; it must be ≥ 1"),
    ("engine.timeout_minutes=0", "'engine.timeout_minutes': 0.0; it must be > 0"),
    ("data.augment.p=1.5", "'data.augment.p': 1.5; it must be ≥ 0 and ≤ 1"),
    ("train.precision=fp16", "'train.precision': 'fp16'; choose one of auto, bf16, fp32"),
    ("data.fold=5", "'data.fold': 5; it must lie in [0, data.n_folds=5)"),
    ("lsor.warmup_epochs=60", "'lsor.warmup_epochs': 60 warm-up epochs of train.epochs=50"),
    ("evaluate.age_interval_level=1.0", "'evaluate.age_interval_level': 1.0; a prediction "
                                        "interval's level lies strictly between 0 and 1"),
    ("evaluate.age_correction=smith", "'evaluate.age_correction': 'smith'; choose one of "
                                      "beheshti, delange"),
    ("evaluate.age_calibration_subjects=test", "choose one of auto, training, validation, both"),
])
def test_bad_values_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["lsor.yaml"], [override])


def test_bad_values_exit_2_from_the_command_line(capsys):
    from hpcbrain.cli import main

    assert main(["config", "--cfg", "lsor.yaml", "train.epochs=0"]) == 2
    assert "'train.epochs': 0; it must be ≥ 1" in capsys.readouterr().err


def test_global_batch_must_split_over_ranks_and_accumulation():
    from hpcbrain.config_checks import check_global_batch

    cfg = load_config(["lsor.yaml"], ["train.batch_size=24", "engine.grad_accum_steps=2"])
    assert check_global_batch(cfg, 3) == 4
    with pytest.raises(ConfigError, match=r"divisible by the 5 ranks × engine.grad_accum_steps 2: "
                                          r"e.g. train.batch_size=20"):
        check_global_batch(cfg, 5)
