"""ctrain.settings: one field per fact, ``.env`` read when present (the real environment wins), and an
unknown ``CTRAIN_*`` variable refused with the list of known ones."""

from __future__ import annotations

import os
import re
import subprocess
from typing import TYPE_CHECKING

import pytest

from ctrain.errors import ConfigError
from ctrain.settings import PROJECT_ROOT, Settings, get_settings, known_variables

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No CTRAIN_* in the environment, and a working directory of our own (for its .env)."""
    for key in [k for k in os.environ if k.startswith("CTRAIN_")]:
        monkeypatch.delenv(key)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_a_dotenv_file_is_read_and_the_real_environment_wins(clean_env: Path, monkeypatch) -> None:
    (clean_env / ".env").write_text(f"CTRAIN_HOME={clean_env / 'home'}\nCTRAIN_MAX_EPOCHS=7\n"
                                    "CTRAIN_S3_ENDPOINT_URL=http://minio:9000\n")
    monkeypatch.setenv("CTRAIN_MAX_EPOCHS", "9")
    settings = get_settings()
    assert settings.home == clean_env / "home"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.max_epochs == 9  # the environment wins over .env
    assert os.environ["CTRAIN_HOME"] == str(clean_env / "home")  # exported for Feast and scripts


def test_an_unknown_ctrain_variable_is_refused_with_the_known_ones(clean_env: Path, monkeypatch) -> None:
    monkeypatch.setenv("CTRAIN_OBJECT_ROTO", "s3://bucket")
    with pytest.raises(ConfigError) as refused:
        get_settings()
    message = str(refused.value)
    assert "CTRAIN_OBJECT_ROTO (in the environment), did you mean CTRAIN_OBJECT_ROOT?" in message
    assert all(name in message for name in known_variables())
    monkeypatch.delenv("CTRAIN_OBJECT_ROTO")

    (clean_env / ".env").write_text("CTRAIN_LAUNCHR=docker\n")
    with pytest.raises(ConfigError, match=re.escape(f"CTRAIN_LAUNCHR (in {clean_env / '.env'})")):
        get_settings()


def test_test_hooks_and_image_build_knobs_are_not_settings(clean_env: Path, monkeypatch) -> None:
    monkeypatch.setenv("CTRAIN_TEST_RECORD_DIR", "/tmp/x")
    monkeypatch.setenv("CTRAIN_IMAGES_DOCKER_STATE", "/var/lib/ctrain-docker")  # scripts/images.sh's
    assert {"CTRAIN_TEST_RECORD_DIR", "CTRAIN_IMAGES_DOCKER_STATE"}.isdisjoint(known_variables())
    get_settings()


def test_every_ctrain_variable_the_repository_names_is_known() -> None:
    """Scripts, docs, compose and the trainer's env contract name only real settings (or test hooks)."""
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    named: set[str] = set()
    for name in files:
        path = PROJECT_ROOT / name
        if name == "tests/test_settings.py":  # this file's typos are deliberate
            continue
        if path.suffix in {".py", ".sh", ".md", ".yaml", ".yml", ".example", ""} and path.is_file():
            named |= set(re.findall(r"\bCTRAIN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="ignore")))
    # Prefixes in prose ("CTRAIN_*"), the test-hook prefix, and a fault-injection hook that is being removed.
    named = {n for n in named if not n.startswith(("CTRAIN_TEST_", "CTRAIN_IMAGES_"))}
    assert named - known_variables() == set()


def test_env_example_documents_every_setting() -> None:
    documented = set(re.findall(r"CTRAIN_[A-Z0-9_]+", (PROJECT_ROOT / ".env.example").read_text()))
    assert documented == known_variables()


def test_constructed_settings_keep_explicit_values(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, up_timeout_s=120)
    assert settings.up_timeout_s == 120 and settings.resolved_object_root == f"file://{tmp_path / 'objects'}"
