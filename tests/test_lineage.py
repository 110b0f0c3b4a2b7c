"""One run identity: the run key comes from the trainer's semantic config hash, not from the file's bytes."""

from __future__ import annotations

import pytest

from ctrain import pipeline
from ctrain.errors import ConfigError
from ctrain.settings import PROJECT_ROOT
from support import pipeline_settings

SNAPSHOT = {"uri": "file:///snapshots/v1", "dataset_version": "v1"}


def _key(tmp_path, text: str, overrides: dict | None = None, name: str = "c") -> pipeline.RunIdentity:
    config = tmp_path / f"{name}.yaml"
    config.write_text(text)
    settings = pipeline_settings(tmp_path / name, training__config=config)
    return pipeline.run_identity(settings, "dag", SNAPSHOT, overrides)


@pytest.fixture
def debug_yaml() -> str:
    return (PROJECT_ROOT / "training_image" / "configs" / "debug.yaml").read_text()


def test_a_comment_or_formatting_edit_keeps_the_run_key(tmp_path, debug_yaml) -> None:
    base = _key(tmp_path, debug_yaml, name="base")
    edited = _key(tmp_path, "# reviewed: fine as it is\n" + debug_yaml.replace("lr: 0.01", "lr: 0.010  # tuned"),
                  name="comment")
    relocated = _key(tmp_path, debug_yaml.replace("experiment: ctrain-debug", "experiment: elsewhere"),
                     name="unhashed")  # tracking.experiment does not change what is trained
    assert edited.run_key == base.run_key == relocated.run_key
    assert edited.config_hash == base.config_hash


def test_a_real_change_gives_another_run_key(tmp_path, debug_yaml) -> None:
    base = _key(tmp_path, debug_yaml, name="base")
    changed = _key(tmp_path, debug_yaml.replace("lr: 0.01", "lr: 0.02"), name="lr")
    overridden = _key(tmp_path, debug_yaml, {"optimizer.lr": 0.02}, name="override")
    assert len({base.run_key, changed.run_key}) == 2
    assert overridden.run_key == changed.run_key  # the same config, by file or by trigger


def test_the_key_matches_the_hash_the_trainer_records(tmp_path, debug_yaml) -> None:
    from trainer.config import load_config

    identity = _key(tmp_path, debug_yaml)
    sets = [f"{k}={v}" for k, v in identity.overrides.items()]
    cfg = load_config(identity.config_path, [*sets, "checkpoint.uri=file:///c", "output.uri=file:///o"])
    assert cfg.config_hash() == identity.config_hash


def test_a_config_the_trainer_would_refuse_is_refused_before_anything_runs(tmp_path, debug_yaml) -> None:
    with pytest.raises(ConfigError, match="optimizer.lr"):
        _key(tmp_path, debug_yaml.replace("lr: 0.01", "lr: -1"))
