"""No credential leaks: canary secrets in the environment never reach a log, MLflow, result.json, the audit
trail, the trainer's resolved-config artifact or anything else ctrain writes.

Two paths, each with every credential a deployment hands ctrain set to a unique canary value:
- embedded: the whole DAG under ``airflow dags test`` (the e2e tests' run, see ``test_e2e``),
  then every byte of the ctrain home (Airflow and MLflow databases, task logs, artifacts, objects);
- S3: every pipeline step in this process against a real S3 endpoint (moto server on loopback) that
  authenticates with the canary keys, then every object in the bucket, every MLflow param, tag and
  artifact, the INFO log of the steps and the trainer's streamed output.
Credentials inside a URI are refused at the door, with a message that does not repeat them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from support import CANARIES, files_under, leaks, mlflow_records, moto_s3, pipeline_settings

if TYPE_CHECKING:
    from pathlib import Path

# ---- S3 ------------------------------------------------------------------------------------------
@pytest.fixture
def s3_pipeline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Every pipeline step on ``s3://ctrain/objects`` (moto server), credentials = the canaries."""
    import boto3

    from ctrain import pipeline
    from ctrain.settings import get_settings
    from ctrain_examples import fraud

    # The fraud definition with a policy for a 2-epoch model (GX and lineage required; the floor by Param).
    pipelines = tmp_path / "pipelines"
    pipeline_settings(tmp_path / "home", "fraud", pipelines=pipelines)
    (pipelines / "policies" / "fraud.yaml").write_text("version: secrets-test\n")
    env = {**CANARIES, "CTRAIN_HOME": str(tmp_path / "home"), "CTRAIN_OBJECT_ROOT": "s3://ctrain/objects",
           "CTRAIN_PIPELINES_DIR": str(pipelines),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"}
    output: list[str] = []
    caplog.set_level(logging.INFO)  # what an Airflow task log records
    with moto_s3(monkeypatch, env, "ctrain") as endpoint:
        settings = get_settings()
        fraud.generate(settings.resolved_data_root, days=20, start="2026-01-01", rows_per_day=400, seed=0)
        snapshot = pipeline.build_dataset(settings)
        validation = pipeline.validate(settings, snapshot)
        training = pipeline.train(settings, snapshot, validation, settings.definition.dag_id, "manual__secrets",
                                  {"train.epochs": 2}, sink=output.append)
        evaluation = pipeline.evaluate(settings, training, snapshot)
        registration = pipeline.register(settings, training, snapshot, validation, "manual__secrets")
        decision = pipeline.govern(settings, evaluation, primary_metric_floor=0.0)
        promotion = pipeline.promote(settings, registration, evaluation, decision, "manual__secrets")
        client = boto3.client("s3", endpoint_url=endpoint)
        objects = {
            item["Key"]: client.get_object(Bucket="ctrain", Key=item["Key"])["Body"].read()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="ctrain")
            for item in page.get("Contents", [])
        }
    yield settings, training, promotion, objects, "\n".join(output), caplog.text


@pytest.mark.slow
def test_s3_pipeline_run_leaks_no_credential(s3_pipeline_run) -> None:
    settings, training, promotion, objects, trainer_output, step_log = s3_pipeline_run
    run_key = training["run_key"]
    # What the test scans is the real thing: the trainer's result, its checkpoints, the audit record.
    assert f"objects/runs/{run_key}/result.json" in objects
    assert any(key.startswith(f"objects/checkpoints/{run_key}/") for key in objects)
    assert promotion["audit_uri"].removeprefix("s3://ctrain/") in objects
    assert "launching:" in trainer_output and "resumed from" not in trainer_output
    found = leaks(objects.items())
    found += leaks([("trainer output", trainer_output.encode()), ("step log", step_log.encode())])
    found += leaks(mlflow_records(settings.resolved_tracking_uri))
    found += leaks(files_under(settings.home))
    assert found == []


# ---- credentials in a URI --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "uri"),
    [
        ("CTRAIN_OBJECT_ROOT", f"s3://{CANARIES['AWS_ACCESS_KEY_ID']}:{CANARIES['AWS_SECRET_ACCESS_KEY']}@ctrain/x"),
        ("CTRAIN_MLFLOW_TRACKING_URI", f"https://ops:{CANARIES['MLFLOW_TRACKING_TOKEN']}@mlflow.example/"),
        ("CTRAIN_S3_ENDPOINT_URL", f"http://minio:{CANARIES['AWS_SECRET_ACCESS_KEY']}@127.0.0.1:9000"),
    ],
)
def test_a_setting_with_credentials_in_its_uri_is_refused_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch, variable: str, uri: str
) -> None:
    from ctrain.errors import ConfigError
    from ctrain.settings import get_settings

    monkeypatch.setenv(variable, uri)
    with pytest.raises(ConfigError) as refused:
        get_settings()
    message = str(refused.value)
    assert variable in message and "embeds a password" in message
    assert "by environment" in message  # the fix
    assert leaks([("message", message.encode())]) == []


def test_trainer_refuses_a_uri_with_a_token_without_echoing_it(tmp_path: Path) -> None:
    secret = CANARIES["AWS_SECRET_ACCESS_KEY"]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--set", f"data.dataset_uri=s3://k:{secret}@bucket/data",
         "--set", f"checkpoint.uri=file://{tmp_path}/ckpt", "--set", f"output.uri=file://{tmp_path}/out"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )  # fmt: skip
    assert proc.returncode == 65
    assert "data.dataset_uri: the URI embeds a password" in proc.stderr
    assert secret not in proc.stdout + proc.stderr
    # Nothing ran: the only file is the failure record the launcher reads the exit code from.
    assert not (tmp_path / "mlflow.db").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["failure.json"]
    assert leaks([("failure.json", (tmp_path / "out" / "failure.json").read_bytes())]) == []
