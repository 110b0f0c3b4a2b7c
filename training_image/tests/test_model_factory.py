"""model.factory_prefixes: with an allow-list the trainer refuses, at load, any factory outside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
LOCATIONS = ["data.dataset_uri=file:///nowhere", "checkpoint.uri=file:///nowhere", "output.uri=file:///nowhere"]


@pytest.mark.parametrize("factory", ["os:system", "trainer.modelx:build", "trainer:model"])
def test_factory_outside_the_prefixes_is_refused_at_load(factory):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [*LOCATIONS, f"model.factory={factory}", "model.factory_prefixes=[trainer.model]"])
    message = str(err.value)
    assert f"model.factory {factory!r}" in message
    assert "CTRAIN_MODEL_FACTORY_PREFIXES" in message


@pytest.mark.parametrize("factory", ["trainer.model:mlp", "trainer.model.extra:build"])
def test_factory_under_a_prefix_is_accepted(factory):
    cfg = load_config(CONFIG, [*LOCATIONS, f"model.factory={factory}", "model.factory_prefixes=[trainer.model]"])
    assert cfg.model.factory == factory


def test_without_prefixes_any_module_may_be_named():
    # Command-line use (and the trainer's own tests): whoever runs the command chooses the code anyway.
    assert load_config(CONFIG, [*LOCATIONS, "model.factory=test_helpers:anything"]).model.factory_prefixes is None


def test_a_refused_factory_is_never_imported(tmp_path):
    # A module that leaves a file behind when imported: the refusal must come before any import.
    canary = tmp_path / "imported"
    (tmp_path / "canary_factory.py").write_text(f"open({str(canary)!r}, 'w').close()\ndef build(spec): ...\n")
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(CONFIG),
         *[arg for loc in LOCATIONS for arg in ("--set", loc)],
         "--set", "model.factory=canary_factory:build", "--set", "model.factory_prefixes=[trainer.model]"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 65, done.stderr[-2000:]
    assert "'canary_factory' is not under the allowed prefixes trainer.model" in done.stderr
    assert not canary.exists()
