"""Every object ctrain reads or writes goes through ``ctrain.storage`` with the settings' S3 endpoint.

A moto S3 server on loopback, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` absent and only
``CTRAIN_S3_ENDPOINT_URL`` set: the snapshot, the validation report, the trainer's result.json (written
by the trainer's own storage, read by the pipeline), the evaluation's split reads, the audit trail and the
arrival marker all land in (and come back from) the moto bucket.
"""

from __future__ import annotations

import os
from datetime import date
from typing import TYPE_CHECKING

import pytest

from support import DP_DAYS, DP_ROWS_PER_DAY, DP_START, moto_s3

if TYPE_CHECKING:
    from pathlib import Path

BUCKET = "ctrain"


@pytest.fixture
def s3_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings on ``s3://ctrain/objects`` at a moto server, and a boto3 client on the same server."""
    import boto3

    from ctrain.settings import get_settings

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "CTRAIN_HOME": str(tmp_path / "home"), "CTRAIN_OBJECT_ROOT": f"s3://{BUCKET}/objects"}
    with moto_s3(monkeypatch, env, BUCKET) as endpoint:
        assert "AWS_ENDPOINT_URL" not in os.environ and "AWS_ENDPOINT_URL_S3" not in os.environ
        yield get_settings(), boto3.client("s3", endpoint_url=endpoint)


def _keys(client) -> set[str]:
    return {item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for item in page.get("Contents", [])}


def test_every_object_goes_to_the_settings_endpoint(s3_settings) -> None:
    from ctrain import (
        arrival,
        evaluation,
        featurestore,
        layout,
        pipeline,
        registry,
        snapshot,
        storage,
    )
    from ctrain.validation import suite_config, validate_snapshot
    from ctrain_examples import fraud
    from trainer.cli import write_result
    from trainer.contract import TrainerResult

    settings, client = s3_settings
    root = settings.resolved_object_root
    fraud.generate(settings.resolved_data_root, days=DP_DAYS, start=DP_START, seed=0,
                     rows_per_day=DP_ROWS_PER_DAY, n_customers=300, n_merchants=40)
    featurestore.apply_feature_repo(settings)

    # Snapshot: built into the bucket, then read back verified (and reused, not rewritten).
    info = snapshot.build_snapshot(settings, val_days=1, test_days=1)
    prefix = f"objects/datasets/{info.dataset_version}/"
    assert {f"{prefix}{name}" for name in ("train.parquet", "val.parquet", "test.parquet", "manifest.json")} <= _keys(client)
    manifest, frames = snapshot.load_snapshot(info.uri)
    assert manifest == info.manifest and sum(len(f) for f in frames.values()) == manifest["rows"]
    assert not snapshot.build_snapshot(settings, val_days=1, test_days=1).created

    # Validation report (its gate outcome does not matter here: where it is written does).
    report = validate_snapshot(info.uri, layout.reports_root(root), suite_config(settings.definition))
    key = report.report_uri.removeprefix(f"s3://{BUCKET}/")
    assert key.startswith("objects/reports/validations/") and key in _keys(client)
    assert any(k.endswith("data_docs/index.html") for k in _keys(client))

    # result.json: written by the trainer's storage (its env contract: CTRAIN_S3_ENDPOINT_URL), read by the pipeline.
    output_uri = layout.run_output_uri(root, "run-key")
    written = TrainerResult(status="succeeded", model_uri="models:/m-1", metrics={"test_roc_auc": 0.9})
    write_result(output_uri, written)
    assert "objects/runs/run-key/result.json" in _keys(client)
    assert pipeline._read_result(output_uri) == written

    # Evaluation's split read.
    frame, _ = evaluation.read_split(info.uri, "test")
    assert len(frame) == manifest["splits"]["test"]["rows"]

    # Audit trail.
    record = registry.AuditRecord(model="m", version="1", action="promote", decided_by="policy:t",
                                  policy_version="t", previous_champion=None, metrics_compared={},
                                  reasons=["ok"], dag_run_id="r", at=1.0)
    audit_uri = registry.write_audit(settings, record)
    assert audit_uri.removeprefix(f"s3://{BUCKET}/") in _keys(client)
    assert storage.read_json(audit_uri)["version"] == "1"

    # Arrival sensor's high-water mark.
    landed = arrival.unannounced_partitions(settings)
    assert len(landed) == DP_DAYS
    arrival.mark_announced(settings, [landed[2].isoformat()])
    assert f"objects/state/{settings.pipeline}/{settings.definition.events.table}_announced.json" in _keys(client)
    assert arrival.last_announced(settings) == landed[2]
    assert arrival.unannounced_partitions(settings) == landed[3:]
    assert isinstance(landed[0], date)


def test_a_local_write_is_all_or_nothing(tmp_path: Path) -> None:
    from ctrain import storage

    uri = f"file://{tmp_path}/a/b.json"
    storage.put_json(uri, {"x": 1})
    assert storage.read_json(uri) == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temp file left behind
    assert storage.read_json(f"file://{tmp_path}/absent.json") is None
    assert storage.list_names(f"file://{tmp_path}") == ["a"]
    storage.remove(uri)
    assert not storage.exists(uri)
