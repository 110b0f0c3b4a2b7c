"""The model_rollback__fraud DAG under `airflow dags test` on real Airflow and MLflow (SQLite), in an
isolated ctrain home: the champion goes back to previous through the locked, audited move, decided by the
run's triggering user; a trigger without a reason is refused and moves nothing."""

from __future__ import annotations

import json
import time

import pytest

from support import airflow_cli, make_env, registered_versions

pytestmark = pytest.mark.slow

DAG_ID = "model_rollback__fraud"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A ctrain home with Airflow migrated and fraud_detector v1 then v2 promoted (champion v2, previous v1)."""
    from ctrain import registry
    from ctrain.settings import Settings

    home = tmp_path_factory.mktemp("rollback_dag")
    env = make_env(home)
    migrated = airflow_cli(["db", "migrate"], env)
    assert migrated.returncode == 0, migrated.stdout[-3000:] + migrated.stderr[-3000:]
    settings = Settings(home=home)
    client = registry.get_client(settings)
    champion = None
    for i in range(2):
        (version,) = registered_versions(client, settings, 1, start=i)
        record = registry.AuditRecord(model=settings.model_name, version=version, action="promote",
                                      decided_by="policy:t", policy_version="t", previous_champion=champion,
                                      metrics_compared={}, reasons=["ok"], dag_run_id="r", at=time.time())
        registry.promote(client, settings, version, champion, record)
        champion = version
    return home, env, settings, client


def test_a_rollback_without_a_reason_is_refused(world):
    from ctrain import audit, registry

    home, env, settings, client = world
    before = registry.current_aliases(client, settings.model_name)
    run = airflow_cli(["dags", "test", DAG_ID, "-c", json.dumps({"to": "previous"})], env, timeout=600)
    (home / "no-reason.log").write_text(run.stdout + run.stderr)
    assert run.returncode != 0
    assert "Invalid input for param reason: None is not of type 'string'" in run.stdout + run.stderr
    assert registry.current_aliases(client, settings.model_name) == before
    assert audit.read_chain(settings, settings.model_name)[-1].doc["action"] == "promote"


def test_the_rollback_dag_makes_previous_champion_again(world):
    from ctrain import audit, registry

    home, env, settings, client = world
    conf = {"to": "previous", "reason": "v2 misroutes refunds"}
    run = airflow_cli(["dags", "test", DAG_ID, "-c", json.dumps(conf)], env, timeout=600)
    (home / "rollback.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"rollback DAG failed; log in {home}/rollback.log\n" + run.stdout[-4000:]
    assert registry.current_aliases(client, settings.model_name) == {"champion": "1", "challenger": "2",
                                                                     "previous": "2"}
    record = audit.read_chain(settings, settings.model_name)[-1].doc
    assert (record["action"], record["version"], record["previous_champion"]) == ("rollback", "1", "2")
    # `airflow dags test` triggers as the user "dag_test"; a UI or API trigger gives the logged-in user.
    assert record["decided_by"] == "human:dag_test"
    assert record["reasons"] == ["v2 misroutes refunds"] and record["dag_run_id"].startswith("manual__")
    assert audit.verify(settings, client, settings.model_name) == []
