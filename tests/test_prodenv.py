"""The production profile's facts (``ctrain.prodenv``) and the Feast overrides it relies on, without
starting anything: ``tests/test_prod_profile.py`` runs the profile itself."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from ctrain.errors import ConfigError
from ctrain.settings import PROJECT_ROOT, Settings, get_settings


def test_env_exports_the_profile_without_printing_a_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "AIRFLOW", "MLFLOW_", "AWS_"))}
    env.update({"CTRAIN_HOME": str(tmp_path), "CTRAIN_PROD_DB_PREFIX": "ctrain_prod_unit",
                "CTRAIN_PROD_S3_PORT": "18999", "CTRAIN_MLFLOW_PORT": "18998"})
    from ctrain import prodenv

    secrets = prodenv.ensure_secrets(Settings(home=tmp_path))
    out = subprocess.run([sys.executable, "-m", "ctrain.prodenv", "env"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://postgres@127.0.0.1:5432/" \
           "ctrain_prod_unit_airflow" in out
    assert "export AIRFLOW__CORE__EXECUTOR=LocalExecutor" in out
    assert "export CTRAIN_OBJECT_ROOT=s3://ctrain-prod/objects" in out
    assert "export CTRAIN_S3_ENDPOINT_URL=http://127.0.0.1:18999" in out
    assert "export CTRAIN_MLFLOW_TRACKING_URI=http://127.0.0.1:18998" in out
    assert "export CTRAIN_FEAST_REGISTRY=postgresql+psycopg2://postgres@127.0.0.1:5432/ctrain_prod_unit_feast" in out
    assert f". {tmp_path / 'prod' / 'secrets.env'};" in out  # sourced, not printed
    assert set(secrets) == set(prodenv.SECRET_NAMES) and all(secrets.values())
    assert not [name for name, value in secrets.items() if value in out]
    # the file is the owner's only, and a second call keeps the same values
    assert stat.S_IMODE((tmp_path / "prod" / "secrets.env").stat().st_mode) == 0o600
    assert prodenv.ensure_secrets(Settings(home=tmp_path)) == secrets
    # every exported CTRAIN_* name is a setting (the settings refuse unknown ones)
    from ctrain.settings import known_variables

    exported = {line.split("=", 1)[0].removeprefix("export ") for line in out.splitlines()
                if line.startswith("export CTRAIN_")}
    assert exported <= known_variables(), exported - known_variables()


def test_mlflow_auth_config_names_its_postgres_database_and_no_password(tmp_path):
    from ctrain import prodenv

    settings = Settings(home=tmp_path, prod_db_prefix="ctrain_prod_unit")
    text = prodenv.write_auth_config(settings).read_text()
    assert "database_uri = postgresql+psycopg2://postgres@127.0.0.1:5432/ctrain_prod_unit_mlflow_auth" in text
    assert "admin_password" not in text  # from MLFLOW_AUTH_ADMIN_PASSWORD (the secrets file)


def test_feast_config_takes_registry_and_online_store_from_the_settings(tmp_path, monkeypatch):
    from ctrain.featurestore import feast_env, repo_config

    monkeypatch.setenv("REDIS_PASSWORD", "redis-secret-1")
    settings = Settings(home=tmp_path, feast_registry="postgresql+psycopg2://u@db:5432/feast",
                        feast_online_store="redis:6379,db=3")
    with feast_env(settings):
        config = repo_config(settings)
    assert config.registry.registry_type == "sql"
    assert config.registry.path == "postgresql+psycopg2://u@db:5432/feast"
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string == "redis:6379,db=3,password=redis-secret-1"
    assert config.project == "ctrain"  # the rest is feature_store.yaml's
    assert config.repo_path == PROJECT_ROOT / "feature_repo"


@pytest.mark.parametrize(("variable", "value", "fix"), [
    ("CTRAIN_FEAST_REGISTRY", "postgresql+psycopg2://u:hunter2@db/feast", "PGPASSWORD"),
    ("CTRAIN_FEAST_ONLINE_STORE", "redis:6379,password=hunter2", "REDIS_PASSWORD"),
    ("CTRAIN_PROD_POSTGRES", "postgresql+psycopg2://u:hunter2@db", "PGPASSWORD"),
])
def test_a_password_in_a_feast_or_profile_url_is_refused_without_repeating_it(monkeypatch, variable, value, fix):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        get_settings()
    assert variable in str(refused.value) and "hunter2" not in str(refused.value)
    assert fix in str(refused.value)
