"""ctrain.backup: the restore drill (real Postgres databases, MLflow's registry, Airflow's metadata DB, a moto
S3 object store) and the refusals (a corrupted backup, a non-empty database, a backup inside the store).

Postgres: ``CTRAIN_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``), a role
that may create databases; each test creates its own ``ctrain_ops_drill_*`` databases and drops them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ctrain import storage
from ctrain.backup import Database, alembic_revision, backup, database_urls, databases, restore, verify
from ctrain.errors import ConfigError, DataError
from ctrain.settings import Settings
from support import airflow_cli, make_env, moto_s3

POSTGRES_URL = os.environ.get("CTRAIN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parents[1]
PG_CANARY = "ctrain-canary-pg-password-3c1f"


def _server() -> Database:
    return Database.from_url("airflow", POSTGRES_URL)


@pytest.fixture
def make_db():
    """Creates empty databases on the test server (``make_db(label, password=None) -> URL``); drops them all
    after."""
    server = _server()
    try:
        with server.connect(autocommit=True):
            pass
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Postgres at {server.where()} is not reachable ({exc}); set CTRAIN_TEST_POSTGRES_URL")
        pytest.skip(f"no Postgres at {server.where()}: {exc}")
    names: list[str] = []

    def make(label: str, password: str | None = None) -> str:
        name = f"ctrain_ops_drill_{uuid.uuid4().hex[:8]}_{label}"
        with server.connect(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        user = f"{server.user}:{password}" if password else server.user
        return f"postgresql+psycopg2://{user}@{server.host}:{server.port}/{name}"

    yield make
    with server.connect(autocommit=True) as conn, conn.cursor() as cur:
        for name in names:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sql(url: str, statement: str) -> list[tuple]:
    db = Database.from_url("airflow", url)
    with db.connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(statement)
        return cur.fetchall() if cur.description else []


def _drop(url: str) -> None:
    db = Database.from_url("airflow", url)
    with db.connect(dbname="postgres", autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE "{db.dbname}" WITH (FORCE)')


@pytest.fixture
def small_deployment(tmp_path, monkeypatch, make_db):
    """Settings of a deployment with one small Postgres database (as Airflow's) and three objects."""
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH"):
        monkeypatch.delenv(key, raising=False)
    url = make_db("airflow", password=PG_CANARY)  # trust auth ignores it: it shows it is written nowhere
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", url)
    _sql(url, "CREATE TABLE variable (key text primary key, val text); INSERT INTO variable VALUES ('k', 'v')")
    settings = Settings(home=tmp_path / "home", object_root=f"file://{tmp_path / 'objects'}",
                        mlflow_artifact_root=str(tmp_path / "mlartifacts"))
    for name, data in {"audit/m/1.json": b'{"a": 1}', "datasets/v1/train.parquet": b"PAR1..",
                       "checkpoints/k/step-00000001/manifest.json": b"{}"}.items():
        storage.put_bytes(storage.join(settings.resolved_object_root, name), data, settings)
    return settings, url


def test_each_database_comes_from_its_own_tools_setting(tmp_path, monkeypatch):
    server = "airflow:pw@db.internal:5433"
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"postgresql+psycopg2://{server}/airflow")
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", f"postgresql://{server}/mlflow?sslmode=require")
    (tmp_path / "auth.ini").write_text(f"[mlflow]\ndatabase_uri = postgresql://{server}/mlflow_auth\n")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "auth.ini"))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(
        f"project: p\nregistry:\n  registry_type: sql\n  path: postgresql://{server}/mlflow?sslmode=require\n")
    settings = Settings(home=tmp_path / "home", feature_repo=repo, mlflow_tracking_uri="http://mlflow:5000")
    found, skipped = databases(settings)
    assert [(d.name, d.dbname, d.host, d.port) for d in found] == [
        ("airflow", "airflow", "db.internal", 5433), ("mlflow", "mlflow", "db.internal", 5433),
        ("mlflow_auth", "mlflow_auth", "db.internal", 5433)]
    assert skipped == {"feast": "same database as mlflow"}  # one dump is the backup of both
    assert found[1].libpq_env() == {"PGHOST": "db.internal", "PGPORT": "5433", "PGUSER": "airflow",
                                    "PGDATABASE": "mlflow", "PGPASSWORD": "pw", "PGSSLMODE": "require"}
    monkeypatch.delenv("MLFLOW_BACKEND_STORE_URI")
    assert "mlflow" not in database_urls(settings)  # an http tracking URI is a server, not a database


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_backup_writes_one_manifest_with_every_hash_and_verify_accepts_it(small_deployment, tmp_path):
    settings, _url = small_deployment
    uri, manifest = backup(settings, to=f"file://{tmp_path / 'backups'}")
    base = Path(uri.removeprefix("file://"))
    dump = manifest["databases"]["airflow"]
    assert hashlib.sha256((base / dump["file"]).read_bytes()).hexdigest() == dump["sha256"]
    assert (base / dump["file"]).stat().st_size == dump["bytes"] > 0
    assert dump["alembic_revision"] is None  # this table set is not alembic's
    assert manifest["skipped_databases"]["mlflow"].startswith("not PostgreSQL (sqlite)")
    files = {f["path"]: f for f in manifest["stores"]["objects"]["files"]}
    assert sorted(files) == ["audit/m/1.json", "checkpoints/k/step-00000001/manifest.json",
                             "datasets/v1/train.parquet"]
    assert files["audit/m/1.json"]["sha256"] == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert manifest["objects"] == {"count": 3, "bytes": 8 + 6 + 2}
    assert manifest["stores"]["mlartifacts"]["files"] == []
    assert set(manifest["versions"]) == {"apache-airflow", "mlflow", "feast", "ctrain", "pg_dump"}
    assert json.loads((base / "manifest.json").read_text()) == manifest
    assert not [p for p in base.rglob("*") if p.is_file() and PG_CANARY.encode() in p.read_bytes()]
    assert verify(uri, settings) == manifest


@pytest.mark.parametrize("victim", ["databases/airflow.dump", "stores/objects/audit/m/1.json"])
def test_a_changed_byte_is_refused_by_verify_and_restore_naming_the_file(small_deployment, tmp_path, victim):
    settings, url = small_deployment
    uri, _ = backup(settings, to=f"file://{tmp_path / 'backups'}")
    _flip_a_byte(Path(uri.removeprefix("file://")) / victim)
    with pytest.raises(DataError, match=f"corrupt, 1 file.*{victim}: sha256 "):
        verify(uri, settings)
    _sql(url, "DELETE FROM variable")
    with pytest.raises(DataError, match=victim):
        restore(uri, settings, force=True)
    # refused before anything changed: the database keeps what it had since the backup
    assert _sql(url, "SELECT count(*) FROM variable") == [(0,)]


def test_restore_refuses_a_database_with_tables_unless_forced(small_deployment, tmp_path):
    settings, url = small_deployment
    uri, _ = backup(settings, to=f"file://{tmp_path / 'backups'}")
    _sql(url, "UPDATE variable SET val = 'changed'")
    with pytest.raises(ConfigError, match=r"refuses to overwrite the airflow database .*\(1 tables\).*--force"):
        restore(uri, settings)
    assert _sql(url, "SELECT val FROM variable") == [("changed",)]
    restore(uri, settings, force=True)
    assert _sql(url, "SELECT key, val FROM variable") == [("k", "v")]


def test_a_restore_with_nowhere_to_put_a_database_is_refused_naming_its_setting(small_deployment, tmp_path,
                                                                               monkeypatch):
    settings, url = small_deployment
    uri, _ = backup(settings, to=f"file://{tmp_path / 'backups'}")
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    with pytest.raises(ConfigError, match=r"holds the airflow database \(AIRFLOW__DATABASE__SQL_ALCHEMY_CONN\)"):
        restore(uri, settings, force=True)
    assert _sql(url, "SELECT key, val FROM variable") == [("k", "v")]


def test_a_backup_without_its_manifest_or_inside_the_store_is_refused(small_deployment, tmp_path):
    settings, _url = small_deployment
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="no manifest.json at .*half: not a complete backup"):
        verify(f"file://{tmp_path / 'half'}", settings)
    with pytest.raises(ConfigError, match="inside the objects store"):
        backup(settings, to=storage.join(settings.resolved_object_root, "backups"))


# ---- the drill ----------------------------------------------------------------------------------------
def _cli(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "ctrain.backup", *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), time.monotonic() - started


def _registry_state(client, name: str) -> dict:
    model = client.get_registered_model(name)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return {"aliases": dict(model.aliases), "versions": {v.version: (dict(v.tags), v.source, v.run_id)
                                                         for v in versions}}


@pytest.mark.slow
def test_restore_drill_brings_back_registry_artifacts_audit_and_airflow(tmp_path, monkeypatch, make_db):
    """Backup, DROP the databases and empty the bucket, restore, and find everything as it was."""
    import boto3
    import mlflow
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore as AuthStore

    from ctrain import registry

    creds = {"AWS_ACCESS_KEY_ID": "drill", "AWS_SECRET_ACCESS_KEY": "drill-secret"}
    with moto_s3(monkeypatch, creds, bucket="ctrain") as endpoint:
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="ctrain-backups")
        mlflow_url, airflow_url, auth_url = make_db("mlflow"), make_db("airflow"), make_db("auth")
        (tmp_path / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {auth_url}\n")
        settings = Settings(home=tmp_path / "home", object_root="s3://ctrain/objects",
                            mlflow_tracking_uri=mlflow_url, mlflow_artifact_root="s3://ctrain/mlartifacts",
                            s3_endpoint_url=endpoint)

        # MLflow: two runs with an artifact each, two versions, champion/previous, version tags
        client = registry.get_client(settings)
        experiment = client.create_experiment("drill", artifact_location="s3://ctrain/mlartifacts/drill")
        client.create_registered_model("drill_model")
        for i in (1, 2):
            run = client.create_run(experiment)
            client.log_text(run.info.run_id, f"weights of v{i}\n", "model/weights.txt")
            client.set_terminated(run.info.run_id)
            client.create_model_version("drill_model", f"{run.info.artifact_uri}/model", run.info.run_id,
                                        tags={"dataset_version": f"ds{i}", "seed": str(i)})
        client.set_registered_model_alias("drill_model", "champion", "2")
        client.set_registered_model_alias("drill_model", "previous", "1")
        before = _registry_state(client, "drill_model")
        audits = [registry.write_audit(settings, registry.AuditRecord(
            model="drill_model", version=v, action="promote", decided_by="policy:v1", policy_version="v1",
            previous_champion=p, metrics_compared={"test_roc_auc": 0.9}, reasons=[], dag_run_id=f"r{v}",
            at=1_700_000_000.0 + int(v))) for v, p in (("1", None), ("2", "1"))]
        audit_bytes = [storage.read_bytes(uri, settings) for uri in audits]

        # MLflow basic auth: its user store (own alembic table) with a user in it
        auth = AuthStore()
        auth.init_db(auth_url)
        auth.create_user("drill-user", "drill-password-1")

        # Airflow: a migrated metadata DB with a variable in it
        # Airflow on the drill's database; ctrain on moto (make_env drops the CTRAIN_* moto_s3 set)
        env = make_env(tmp_path / "home") | {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_url,
            # Airflow derives postgresql+asyncpg for its async engine and asyncpg is not in the lock; the
            # CLI commands run here use the sync engine only, and an empty async URL turns the other off.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "",
            "CTRAIN_HOME": str(tmp_path / "home"), "CTRAIN_OBJECT_ROOT": settings.object_root,
            "CTRAIN_MLFLOW_TRACKING_URI": mlflow_url, "CTRAIN_MLFLOW_ARTIFACT_ROOT": settings.mlflow_artifact_root,
            "CTRAIN_S3_ENDPOINT_URL": endpoint, "CTRAIN_BACKUP_URI": "s3://ctrain-backups/drill",
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "training_image"),
                                           os.environ.get("PYTHONPATH", "")])}
        for args in (["db", "migrate"], ["variables", "set", "drill_variable", "kept across the restore"]):
            out = airflow_cli(args, env)
            assert out.returncode == 0, out.stdout + out.stderr
        dbs = {name: Database.from_url(name, url)
               for name, url in (("airflow", airflow_url), ("mlflow", mlflow_url), ("mlflow_auth", auth_url))}
        heads = {name: alembic_revision(db) for name, db in dbs.items()}
        assert heads["mlflow_auth"].startswith("alembic_version_auth:")

        made, backup_s = _cli(["backup"], env)
        manifest = json.loads(storage.read_bytes(storage.join(made["backup"], "manifest.json"), settings))
        assert {n: d["alembic_revision"] for n, d in manifest["databases"].items()} == heads
        assert None not in heads.values()
        assert {s: len(c["files"]) for s, c in manifest["stores"].items()} == {"objects": 2, "mlartifacts": 2}

        # disaster: both databases dropped, every object of the bucket deleted
        for url in (mlflow_url, airflow_url, auth_url):
            _drop(url)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ctrain").get("Contents", [])]
        assert len(keys) == 4
        s3.delete_objects(Bucket="ctrain", Delete={"Objects": [{"Key": k} for k in keys]})
        assert s3.list_objects_v2(Bucket="ctrain").get("KeyCount") == 0

        _, verify_s = _cli(["verify", made["backup"]], env)
        restored, restore_s = _cli(["restore", made["backup"]], env)
        assert restored["objects"] == manifest["objects"]

        client = registry.get_client(settings)
        assert _registry_state(client, "drill_model") == before
        assert {k: str(v) for k, v in before["aliases"].items()} == {"champion": "2", "previous": "1"}
        with registry.mlflow_at(settings):
            local = mlflow.artifacts.download_artifacts(artifact_uri="models:/drill_model@champion",
                                                        dst_path=str(tmp_path / "dl"))
        assert (Path(local) / "weights.txt").read_text() == "weights of v2\n"
        assert [storage.read_bytes(uri, settings) for uri in audits] == audit_bytes
        auth = AuthStore()
        auth.init_db(auth_url)  # also runs its migrations: none to run
        assert auth.authenticate_user("drill-user", "drill-password-1")
        assert not auth.authenticate_user("drill-user", "wrong")
        out = airflow_cli(["variables", "get", "drill_variable"], env)
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "kept across the restore"

        # the restored schemas are at their tools' heads: upgrading them changes nothing
        out = airflow_cli(["db", "migrate"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        out = airflow_cli(["db", "check-migrations", "--migration-wait-timeout", "0"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        out = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "db", "upgrade", mlflow_url],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert {name: alembic_revision(db) for name, db in dbs.items()} == heads

        # a second restore over the live databases is refused
        refused = subprocess.run([sys.executable, "-m", "ctrain.backup", "restore", made["backup"]], env=env,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 65 and "restore refuses to overwrite the airflow database" in refused.stderr
        assert "; the mlflow database" in refused.stderr and "--force" in refused.stderr
        print(json.dumps({"drill": {"backup_s": round(backup_s, 1), "verify_s": round(verify_s, 1),
                                    "restore_s": round(restore_s, 1),
                                    "dump_bytes": {n: d["bytes"] for n, d in manifest["databases"].items()},
                                    "objects": manifest["objects"]}}))
