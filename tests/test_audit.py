"""The audit chain, alias history, external-move detection, rollback and retirement, on a real MLflow
(SQLite store) and the real ``ctrain`` command (``python -m ctrain``, this checkout's sources)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctrain import audit, layout, registry, storage
from ctrain.errors import ConfigError, DataError
from support import pipeline_settings, registered_versions


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")  # one MLflow DB per module: creating one costs seconds


@pytest.fixture
def settings(home, request):
    test = request.node.name[:40]
    return pipeline_settings(home, pipelines=home / "pipelines" / test, model__name=f"m_{test}")


@pytest.fixture
def client(settings):
    return registry.get_client(settings)


def _promote(client, settings, version: str, expected: str | None, by: str = "policy:t") -> str:
    record = registry.AuditRecord(model=settings.model_name, version=version, action="promote", decided_by=by,
                                  policy_version="t", previous_champion=expected, metrics_compared={"m": 1.0},
                                  reasons=["ok"], dag_run_id=f"promote-{version}", at=time.time())
    return registry.promote(client, settings, version, expected, record)


def _promoted(client, settings, count: int) -> list[str]:
    """``count`` versions, each registered then promoted over the one before."""
    versions: list[str] = []
    for i in range(count):
        (version,) = registered_versions(client, settings, 1, start=i)
        _promote(client, settings, version, versions[-1] if versions else None)
        versions.append(version)
    return versions


def _ctrain(settings, *args: str) -> subprocess.CompletedProcess:
    """``python -m ctrain ARGS`` on this checkout's sources, in the settings' home and pipelines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTRAIN_", "MLFLOW_"))}
    env.update(CTRAIN_HOME=str(settings.home), CTRAIN_PIPELINES_DIR=str(settings.pipelines_dir))
    return subprocess.run([sys.executable, "-m", "ctrain", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _chain_file(settings, seq: int) -> Path:
    return Path(layout.audit_record_uri(settings.resolved_object_root, settings.model_name, seq).removeprefix("file://"))


def test_each_record_holds_the_previous_hash_and_the_head_is_anchored(client, settings):
    v1, v2 = _promoted(client, settings, 2)
    chain = audit.read_chain(settings, settings.model_name)
    assert [(e.doc["action"], e.doc["version"]) for e in chain] == [
        ("register", v1), ("promote", v1), ("register", v2), ("promote", v2)]
    assert [e.seq for e in chain] == [0, 1, 2, 3]
    assert chain[0].doc["prev_sha256"] == ""
    for before, entry in zip(chain, chain[1:], strict=False):
        assert entry.doc["prev_sha256"] == before.sha256
        assert audit.digest(entry.doc) == entry.sha256
    assert chain[-1].aliases == {"champion": v2, "challenger": v2, "previous": v1}
    tag = client.get_registered_model(settings.model_name).tags[audit.HEAD_TAG]
    assert tag == f"3:{chain[-1].sha256}"
    # The readers of a promotion's record (the e2e tests) find the AuditRecord fields at the top level.
    promoted = storage.read_json(client.get_model_version(settings.model_name, v2).tags["promotion_audit"])
    assert (promoted["seq"], promoted["action"], promoted["previous_champion"]) == (3, "promote", v1)
    assert audit.verify(settings, client, settings.model_name) == []


def test_a_retried_promotion_writes_no_second_record(client, settings):
    (v1,) = registered_versions(client, settings, 1)
    first = _promote(client, settings, v1, None)
    again = _promote(client, settings, v1, None)
    assert first == again
    assert [e.doc["action"] for e in audit.read_chain(settings, settings.model_name)] == ["register", "promote"]


def test_audit_verify_exits_0_on_an_intact_chain_and_records_outside_moves(client, settings):
    v1, v2 = _promoted(client, settings, 2)
    done = _ctrain(settings, "audit", "verify", settings.model_name)
    assert done.returncode == 0, done.stderr
    assert f"{settings.model_name}: audit chain intact (4 records" in done.stdout
    client.delete_registered_model_alias(settings.model_name, "previous")  # someone in the MLflow UI
    done = _ctrain(settings, "audit", "verify", settings.model_name)
    assert done.returncode == 0, done.stderr
    assert (f"{settings.model_name}: aliases moved outside ctrain, recorded as record 4: "
            f"{{'previous': {{'from': '{v1}', 'to': None}}}}") in done.stdout
    assert f"WARNING ctrain.audit: aliases of {settings.model_name} moved outside ctrain" in done.stderr


def test_audit_verify_catches_an_edited_record(client, settings):
    v1, v2 = _promoted(client, settings, 2)
    path = _chain_file(settings, 1)
    doc = json.loads(path.read_text())
    doc["decided_by"] = "human:mallory"
    path.write_text(json.dumps(doc))
    done = _ctrain(settings, "audit", "verify", settings.model_name)
    assert done.returncode == 1
    assert "audit chain BROKEN: record 1 edited" in done.stdout and "no longer matches its sha256" in done.stdout

    # An editor who also recomputes the record's own hash is caught by the next record's link.
    doc["sha256"] = audit.digest(doc)
    path.write_text(json.dumps(doc))
    assert audit.verify(settings, client, settings.model_name) == [
        f"record 1 edited or replaced: record 2 holds another hash of it ({_chain_file(settings, 2).as_uri()})"]
    # And no alias moves on a broken chain.
    with pytest.raises(DataError, match="is broken: record 1 edited or replaced.* Nothing was moved"):
        registry.rollback(client, settings, "previous", "bad model", "cli:test")
    assert registry.current_aliases(client, settings.model_name)["champion"] == v2


def test_audit_verify_catches_a_deleted_middle_record(client, settings):
    _promoted(client, settings, 2)
    _chain_file(settings, 1).unlink()
    done = _ctrain(settings, "audit", "verify", settings.model_name)
    assert done.returncode == 1
    assert "audit chain BROKEN: record 1 deleted: the chain goes from record 0 to 2" in done.stdout


def test_a_deleted_tail_is_caught_and_blocks_the_next_move(client, settings):
    v1, v2 = _promoted(client, settings, 2)
    _chain_file(settings, 3).unlink()  # the newest record: the rest of the chain is still consistent
    done = _ctrain(settings, "audit", "verify", settings.model_name)
    assert done.returncode == 1
    assert "audit chain BROKEN: tail missing: records 3..3 deleted" in done.stdout
    # An append would reuse number 3 and hide the deletion: every move refuses, and moves nothing.
    with pytest.raises(DataError, match="audit chain of .* is broken: tail missing: .* Nothing was moved"):
        registry.rollback(client, settings, "previous", "bad model", "cli:test")
    assert registry.current_aliases(client, settings.model_name)["champion"] == v2
    assert len(audit.read_chain(settings, settings.model_name)) == 3


def test_history_prints_who_held_each_alias_when(client, settings):
    v1, v2 = _promoted(client, settings, 2)
    done = _ctrain(settings, "history", settings.model_name)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"alias history of {settings.model_name}"
    assert lines[1].split() == ["alias", "version", "from", "(UTC)", "until", "(UTC)", "set", "by"]
    rows = [line.split() for line in lines[2:]]
    # alias, version, then the tenure's end ("now" or a date and time), then what set it.
    summary = [(r[0], r[1], r[4] if r[4] == "now" else "ended", " ".join(r[-5:])) for r in rows]
    assert summary == [
        ("champion", f"v{v1}", "ended", "promote by policy:t (record 1)"),
        ("champion", f"v{v2}", "now", "promote by policy:t (record 3)"),
        ("challenger", f"v{v1}", "ended", "register by pipeline (record 0)"),
        ("challenger", f"v{v2}", "now", "register by pipeline (record 2)"),
        ("previous", f"v{v1}", "now", "promote by policy:t (record 3)"),
    ]


def test_an_alias_moved_outside_ctrain_is_recorded_and_reported(client, settings, caplog):
    v1, v2 = _promoted(client, settings, 2)
    client.set_registered_model_alias(settings.model_name, "champion", v1)  # someone in the MLflow UI
    with caplog.at_level("WARNING", logger="ctrain.audit"):
        chain = registry.check_external_moves(client, settings)
    assert len(chain) == 5
    moved = chain[-1].doc
    assert moved["action"] == "external_move" and moved["decided_by"] == "outside ctrain"
    assert moved["details"]["changes"] == {"champion": {"from": v2, "to": v1}}
    assert chain[-1].aliases["champion"] == v1
    assert f"aliases of {settings.model_name} moved outside ctrain: champion v{v2} -> v{v1}" in caplog.text
    assert audit.verify(settings, client, settings.model_name) == []
    # Recorded once: the chain now agrees with MLflow.
    assert len(registry.check_external_moves(client, settings)) == len(chain)


def test_a_move_interrupted_after_its_record_is_completed_by_the_retry(client, settings, monkeypatch):
    v1, v2 = registered_versions(client, settings, 2)
    _promote(client, settings, v1, None)
    real_apply = registry._apply

    def crash(*args):  # the worker dies after the record is committed, before any alias moves
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(registry, "_apply", crash)
    with pytest.raises(KeyboardInterrupt):
        _promote(client, settings, v2, v1)
    assert registry.current_aliases(client, settings.model_name)["champion"] == v1
    assert audit.read_chain(settings, settings.model_name)[-1].doc["action"] == "promote"
    monkeypatch.setattr(registry, "_apply", real_apply)
    uri = _promote(client, settings, v2, v1)  # Airflow's retry of the task
    chain = audit.read_chain(settings, settings.model_name)
    assert [e.doc["action"] for e in chain].count("external_move") == 0
    assert uri == chain[-1].uri and chain[-1].doc["version"] == v2
    assert registry.current_aliases(client, settings.model_name) == {"champion": v2, "challenger": v2,
                                                                     "previous": v1}


def test_rollback_on_the_command_line(client, settings):
    v1, v2, v3 = _promoted(client, settings, 3)
    done = _ctrain(settings, "rollback", settings.model_name, "--to", "previous", "--reason", "v3 drifts")
    assert done.returncode == 0, done.stderr
    assert registry.current_aliases(client, settings.model_name) == {"champion": v2, "challenger": v3,
                                                                     "previous": v3}
    record = audit.read_chain(settings, settings.model_name)[-1].doc
    assert (record["action"], record["version"], record["previous_champion"]) == ("rollback", v2, v3)
    assert record["decided_by"].startswith("cli:") and record["reasons"] == ["v3 drifts"]

    done = _ctrain(settings, "rollback", settings.model_name, "--to", v1, "--reason", "back to the first")
    assert done.returncode == 0, done.stderr
    assert registry.current_aliases(client, settings.model_name)["champion"] == v1
    assert registry.current_aliases(client, settings.model_name)["previous"] == v2

    before = len(audit.read_chain(settings, settings.model_name))
    refused = _ctrain(settings, "rollback", settings.model_name, "--to", "99", "--reason", "typo")
    assert refused.returncode == 2
    assert f"ConfigError: rollback --to '99': {settings.model_name} has no version 99" in refused.stderr
    assert len(audit.read_chain(settings, settings.model_name)) == before
    assert audit.verify(settings, client, settings.model_name) == []


def test_rollback_needs_a_reason_and_a_previous(client, settings):
    (v1,) = _promoted(client, settings, 1)
    with pytest.raises(ConfigError, match="rollback needs a reason"):
        registry.rollback(client, settings, "previous", " ", "cli:test")
    with pytest.raises(ConfigError, match="has no previous version to roll back to"):
        registry.rollback(client, settings, "previous", "why not", "cli:test")
    assert registry.current_aliases(client, settings.model_name)["champion"] == v1


def test_retirement_keeps_the_newest_and_every_alias_holder(client, settings):
    v1, v2, v3, v4, v5 = registered_versions(client, settings, 5)
    _promote(client, settings, v1, None)
    _promote(client, settings, v2, v1)  # champion v2, previous v1, challenger v5
    client.set_registered_model_alias(settings.model_name, "canary", v3)  # an alias ctrain does not own
    done = _ctrain(settings, "retire", settings.model_name, "--keep", "2", "--reason", "cleanup")
    assert done.returncode == 0, done.stderr
    assert f"retired v{v3} (kept 2)" in done.stdout
    name = settings.model_name
    retired = client.get_model_version(name, v3)
    assert retired.tags["ctrain.retired_reason"] == "cleanup" and registry.RETIRED_TAG in retired.tags
    assert retired.aliases == [] and retired.status == "READY"  # artifacts kept: the version stays loadable
    assert str(client.get_logged_model(retired.source.removeprefix("models:/")).status) == "READY"
    for kept in (v1, v2, v4, v5):
        assert registry.RETIRED_TAG not in client.get_model_version(name, kept).tags
    assert registry.current_aliases(client, name) == {"champion": v2, "challenger": v5, "previous": v1}
    record = audit.read_chain(settings, name)[-1].doc
    assert (record["action"], record["version"], record["details"]["aliases_removed"]) == ("retire", v3, ["canary"])
    assert registry.retire(client, settings, 2, "again", "cli:test") == []  # idempotent
    assert audit.verify(settings, client, name) == []


def test_a_conditional_create_lets_exactly_one_writer_have_a_record_number(client, settings):
    (v1,) = registered_versions(client, settings, 1)
    chain = audit.read_chain(settings, settings.model_name)
    audit.append(settings, settings.model_name, {"action": "approve", "version": v1}, audit.state(chain), chain)
    with pytest.raises(audit.AuditConflict, match="audit record 1 of .* was written by another writer first"):
        audit.append(settings, settings.model_name, {"action": "reject", "version": v1}, audit.state(chain), chain)
    assert audit.read_chain(settings, settings.model_name)[1].doc["action"] == "approve"


def test_write_audit_appends_a_decision_without_moving_aliases(client, settings):
    v1, v2 = _promoted(client, settings, 2)
    record = registry.AuditRecord(model=settings.model_name, version=v2, action="reject", decided_by="policy:t",
                                  policy_version="t", previous_champion=v1, metrics_compared={}, reasons=["no"],
                                  dag_run_id="r", at=time.time(), policy_sha256="abc", details={"rules": []})
    uri = registry.write_audit(settings, record)
    chain = audit.read_chain(settings, settings.model_name)
    assert uri == chain[-1].uri and chain[-1].doc["policy_sha256"] == "abc"
    assert chain[-1].aliases == chain[-2].aliases
    assert audit.verify(settings, client, settings.model_name) == []


def test_the_chain_on_s3_appends_with_if_none_match(tmp_path, monkeypatch):
    """moto's server honours ``If-None-Match: *`` on PutObject: on S3 too, one writer per record number."""
    from ctrain.settings import get_settings
    from support import moto_s3

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "CTRAIN_HOME": str(tmp_path / "home"), "CTRAIN_OBJECT_ROOT": "s3://ctrain-audit/objects",
           "CTRAIN_PIPELINES_DIR": str(pipeline_settings(tmp_path / "home", model__name="m_s3").pipelines_dir)}
    with moto_s3(monkeypatch, env, "ctrain-audit"):
        settings = get_settings()
        client = registry.get_client(settings)
        v1, v2 = registered_versions(client, settings, 2)
        _promote(client, settings, v2, None)
        chain = audit.read_chain(settings, "m_s3")
        assert chain[-1].uri == "s3://ctrain-audit/objects/audit/m_s3/00000002.json"
        assert audit.verify(settings, client, "m_s3") == []
        with pytest.raises(FileExistsError):
            storage.create_bytes(chain[-1].uri, b"{}", settings)
        with pytest.raises(audit.AuditConflict):
            audit.append(settings, "m_s3", {"action": "approve"}, audit.state(chain), chain[:-1])
        assert audit.read_chain(settings, "m_s3")[-1].doc == chain[-1].doc


def test_the_retire_step_keeps_the_definitions_keep_versions(home, request):
    from ctrain import pipeline

    settings = pipeline_settings(home, pipelines=home / "pipelines" / "retire_step", model__name="m_retire_step",
                                 governance__keep_versions=1)
    client = registry.get_client(settings)
    v1, v2, v3 = registered_versions(client, settings, 3)
    _promote(client, settings, v1, None)  # champion v1, challenger v3: only v2 holds nothing
    assert pipeline.retire(settings, {"version": v1}, "manual__r") == {"model": "m_retire_step", "keep": 1,
                                                                       "retired": [v2]}
    record = audit.read_chain(settings, settings.model_name)[-1].doc
    assert (record["action"], record["decided_by"], record["dag_run_id"]) == ("retire", "pipeline", "manual__r")
    assert record["reasons"] == ["older than the newest 1 versions"]
