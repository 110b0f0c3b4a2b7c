"""Two promotions started at once, in two processes, on a real MLflow: exactly one wins, the other raises
PromotionConflict and changes no alias, tag or audit record. Once with MLflow on SQLite and the file lock,
once with MLflow on this machine's Postgres and the advisory lock."""

from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest

from ctrain import audit, locks, registry
from support import pipeline_settings, registered_versions

pytestmark = pytest.mark.slow

POSTGRES = "postgresql://postgres@127.0.0.1:5432"  # libpq's URL; MLflow's (SQLAlchemy) names the driver
HOLD_S = 1.5  # how long each promoter sits inside the critical section after reading the aliases


def _promote_in_child(settings_kwargs: dict, version: str, barrier, results) -> None:
    """One promoter: waits for the other at the barrier, then promotes ``version`` over "no champion".

    The aliases read is slowed down (injected here, not in ctrain) so that, without the lock, both would
    read "no champion" before either moved it."""
    from ctrain import registry
    from ctrain.settings import Settings

    settings = Settings(**settings_kwargs)
    client = registry.get_client(settings)
    read = registry.current_aliases

    def slow_read(*args):
        aliases = read(*args)
        time.sleep(HOLD_S)
        return aliases

    registry.current_aliases = slow_read
    record = registry.AuditRecord(model=settings.model_name, version=version, action="promote",
                                  decided_by="policy:race", policy_version="race", previous_champion=None,
                                  metrics_compared={}, reasons=[f"promoter of v{version}"], dag_run_id=version,
                                  at=time.time())
    barrier.wait(timeout=120)
    started = time.monotonic()
    try:
        uri = registry.promote(client, settings, version, None, record)
    except registry.PromotionConflict as exc:
        results.put((version, "conflict", str(exc), time.monotonic() - started))
    except BaseException as exc:
        results.put((version, "error", f"{type(exc).__name__}: {exc}", time.monotonic() - started))
    else:
        results.put((version, "won", uri, time.monotonic() - started))


def _race(settings, settings_kwargs: dict) -> tuple[tuple, tuple]:
    client = registry.get_client(settings)
    v1, v2 = registered_versions(client, settings, 2)
    before = audit.read_chain(settings, settings.model_name)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_promote_in_child, args=(settings_kwargs, v, barrier, results)) for v in (v1, v2)]
    for child in children:
        child.start()
    outcomes = sorted((results.get(timeout=300) for _ in children), key=lambda o: o[1], reverse=True)
    for child in children:
        child.join(timeout=60)
    (winner, won, uri, won_s), (loser, lost, message, lost_s) = outcomes
    assert (won, lost) == ("won", "conflict"), outcomes

    name = settings.model_name
    # The loser waited for the winner's lock, then lost on the compare-and-set: the lock serialized them.
    assert f"champion of {name} is now v{winner}, but this promote was decided when it was unset" in message
    assert "Nothing was moved" in message
    assert lost_s > HOLD_S, outcomes
    assert registry.current_aliases(client, name) == {"champion": winner, "challenger": v2, "previous": None}
    chain = audit.read_chain(settings, name)
    assert len(chain) == len(before) + 1 and chain[-1].uri == uri
    assert (chain[-1].doc["action"], chain[-1].doc["version"]) == ("promote", winner)
    assert "promotion_audit" not in client.get_model_version(name, loser).tags
    assert client.get_model_version(name, winner).tags["promotion_audit"] == uri
    assert audit.verify(settings, client, name) == []
    print(f"race: v{winner} won in {won_s:.2f}s; v{loser} lost after {lost_s:.2f}s")
    return outcomes


def test_two_promotions_at_once_on_sqlite_with_the_file_lock(tmp_path):
    home = tmp_path / "home"
    settings = pipeline_settings(home, model__name="race_sqlite")
    assert locks.lock_kind(settings) == "file"
    assert locks.lock_path(settings, "race_sqlite") == home / "objects" / "locks" / "race_sqlite.lock"
    _race(settings, {"home": home, "pipelines_dir": settings.pipelines_dir, "pipeline": "fraud"})


@pytest.fixture
def postgres_db():
    """An empty database of this test's own on the local Postgres, dropped after."""
    psycopg2 = pytest.importorskip("psycopg2")
    name = f"ctrain_audit_race_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no Postgres at {POSTGRES}: {exc}")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def test_two_promotions_at_once_on_postgres_with_the_advisory_lock(tmp_path, postgres_db):
    home = tmp_path / "home"
    from ctrain.settings import Settings

    pipelines = pipeline_settings(home, model__name="race_postgres").pipelines_dir
    tracking_uri = postgres_db.replace("postgresql://", "postgresql+psycopg2://")
    kwargs = {"home": home, "pipelines_dir": pipelines, "pipeline": "fraud", "mlflow_tracking_uri": tracking_uri}
    settings = Settings(**kwargs)
    assert locks.lock_kind(settings) == "postgres"
    _race(settings, kwargs)


def test_the_advisory_lock_is_bounded_and_per_model(tmp_path, postgres_db):
    from ctrain.settings import Settings

    settings = Settings(home=tmp_path / "home", lock_url=postgres_db, lock_timeout_s=0.5)
    with locks.promotion_lock(settings, "m") as held:
        assert held == f"postgres advisory lock {locks.advisory_key('m')}"
        with locks.promotion_lock(settings, "other model"):
            pass  # another model's lock is free
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            refused = pool.apply(_try_lock, (postgres_db,))
    assert refused == (f"Postgres advisory lock {locks.advisory_key('m')} of m still held by another promotion "
                       "after 0.5s (CTRAIN_LOCK_TIMEOUT_S); retry when it is done")


def _try_lock(url: str) -> str:
    from ctrain import locks
    from ctrain.errors import ServiceUnavailable
    from ctrain.settings import Settings

    settings = Settings(lock_url=url, lock_timeout_s=0.5)
    try:
        with locks.promotion_lock(settings, "m"):
            return "got it"
    except ServiceUnavailable as exc:
        return str(exc)
