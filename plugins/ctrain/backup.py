"""Backup and restore of a deployment's state: its PostgreSQL databases and its object stores.

    python -m ctrain.backup backup [--to URI]       # prints the new backup's URI (under CTRAIN_BACKUP_URI)
    python -m ctrain.backup verify URI              # every hash checked; nothing restored
    python -m ctrain.backup restore URI [--force]   # verify, then recreate the databases and copy the objects back

What is backed up (:func:`databases` and :func:`stores`), each only when it is configured:

- ``airflow``: ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` (Airflow's metadata DB);
- ``mlflow``: ``MLFLOW_BACKEND_STORE_URI`` (the ``mlflow server``'s backend store), else
  ``CTRAIN_MLFLOW_TRACKING_URI`` when it is a database URL (tracking and registry);
- ``mlflow_auth``: ``database_uri`` of the ini file ``MLFLOW_AUTH_CONFIG_PATH`` names (basic-auth users);
- ``feast``: the SQL registry of ``{CTRAIN_FEATURE_REPO}/feature_store.yaml`` (``registry_type: sql``);
- the object root (``CTRAIN_OBJECT_ROOT``: snapshots, checkpoints, reports, the audit trail) and the MLflow
  artifact root (``CTRAIN_MLFLOW_ARTIFACT_ROOT``; for a server with ``--artifacts-destination``, set it
  to that destination), ``file://`` or ``s3://``, through :mod:`ctrain.storage`.

Only PostgreSQL databases are dumped (``pg_dump -Fc``); another URL (SQLite: the embedded profile) is
listed in the manifest as skipped. The connection goes to ``pg_dump``/``pg_restore`` through libpq's
``PG*`` environment variables, the password included: nothing of a URL is in their argv.

A backup is a directory (local or an S3 prefix) ``{CTRAIN_BACKUP_URI}/{UTC time}-{id}/`` with
``databases/{name}.dump``, ``stores/{store}/{path}`` and ``manifest.json``, written last (the commit
marker, as for snapshots and checkpoints): time, Airflow/MLflow/Feast versions, each database's alembic
revision, size and sha256 of every dump and every object, object count and bytes. ``verify`` and
``restore`` check every hash before anything is restored; ``restore`` refuses a non-empty database or
store unless ``--force``, drops and recreates each database, and restores it in one transaction.
Stop the Airflow and MLflow services before a restore: ``DROP DATABASE`` ends their sessions.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrain import storage
from ctrain.errors import ConfigError, DataError, ServiceUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fsspec import AbstractFileSystem

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 8 << 20  # objects are copied and hashed in 8 MiB reads
POSTGRES_SCHEMES = ("postgresql", "postgres")
# Where each database's URL comes from, as the operator would look it up (also the manifest's wording).
DATABASE_SOURCES = {
    "airflow": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "mlflow": "MLFLOW_BACKEND_STORE_URI or CTRAIN_MLFLOW_TRACKING_URI",
    "mlflow_auth": "database_uri in MLFLOW_AUTH_CONFIG_PATH",
    "feast": "registry.path of feature_store.yaml (registry_type: sql)",
}
STORE_SOURCES = {"objects": "CTRAIN_OBJECT_ROOT", "mlartifacts": "CTRAIN_MLFLOW_ARTIFACT_ROOT, outside the object root"}


@dataclass(frozen=True)
class Database:
    """One PostgreSQL database to back up, as libpq connection parameters (never printed with its password)."""

    name: str  # airflow | mlflow | mlflow_auth | feast
    host: str
    port: int
    user: str
    password: str | None
    dbname: str
    sslmode: str | None = None

    @classmethod
    def from_url(cls, name: str, url: str) -> Database:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigError(f"the {name} database URL ({DATABASE_SOURCES[name]}) is not a database URL; "
                              "expected postgresql://user@host:port/database") from None
        if not parsed.database:
            raise ConfigError(f"the {name} database URL ({DATABASE_SOURCES[name]}) names no database")
        return cls(name=name, host=parsed.host or "127.0.0.1", port=parsed.port or 5432,
                   user=parsed.username or "postgres", password=parsed.password, dbname=parsed.database,
                   sslmode=parsed.query.get("sslmode"))  # type: ignore[arg-type]

    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"

    def libpq_env(self, dbname: str | None = None) -> dict[str, str]:
        """The connection for pg_dump/pg_restore/psql, by environment only (``PGPASSWORD`` stays out of argv)."""
        env = {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
               "PGDATABASE": dbname or self.dbname}
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        if self.sslmode:
            env["PGSSLMODE"] = self.sslmode
        return env

    @contextmanager
    def connect(self, dbname: str | None = None, autocommit: bool = False) -> Iterator[Any]:
        import psycopg2

        try:
            conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                    dbname=dbname or self.dbname, sslmode=self.sslmode or "prefer",
                                    connect_timeout=10)
        except psycopg2.OperationalError as exc:
            raise ServiceUnavailable(f"cannot connect to the {self.name} database {self.where()}: "
                                     f"{str(exc).strip()}") from None
        conn.autocommit = autocommit
        try:
            yield conn
        finally:
            conn.close()


# ---- what a deployment has ----------------------------------------------------------------------
def database_urls(settings: Settings) -> dict[str, str]:
    """Every configured database URL by name (see the module docstring), PostgreSQL or not."""
    urls: dict[str, str] = {}
    if os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        urls["airflow"] = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    mlflow = os.environ.get("MLFLOW_BACKEND_STORE_URI") or settings.resolved_tracking_uri
    if not mlflow.startswith(("http://", "https://")):
        urls["mlflow"] = mlflow
    if os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        config = configparser.ConfigParser()
        config.read(os.environ["MLFLOW_AUTH_CONFIG_PATH"])
        if config.has_option("mlflow", "database_uri"):
            urls["mlflow_auth"] = config["mlflow"]["database_uri"]
    feast = _feast_sql_registry(settings)
    if feast:
        urls["feast"] = feast
    return urls


def _feast_sql_registry(settings: Settings) -> str | None:
    import yaml

    from ctrain.featurestore import feast_env

    path = Path(settings.feature_repo) / "feature_store.yaml"
    if not path.is_file():
        return None
    with feast_env(settings):  # feature_store.yaml names ${CTRAIN_HOME}; Feast expands it the same way
        config = yaml.safe_load(os.path.expandvars(path.read_text())) or {}
    registry = config.get("registry")
    if isinstance(registry, dict) and registry.get("registry_type") == "sql":
        return str(registry.get("path") or "") or None
    return None


def _is_postgres(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in POSTGRES_SCHEMES


def databases(settings: Settings) -> tuple[list[Database], dict[str, str]]:
    """The PostgreSQL databases to dump, and the other configured ones (name -> why skipped)."""
    found: list[Database] = []
    skipped: dict[str, str] = {}
    seen: dict[tuple[str, int, str], str] = {}
    for name, url in database_urls(settings).items():
        if not _is_postgres(url):
            skipped[name] = f"not PostgreSQL ({url.split(':', 1)[0]}): back it up with its files"
            continue
        db = Database.from_url(name, url)
        key = (db.host, db.port, db.dbname)
        if key in seen:  # e.g. Feast's registry in MLflow's database: one dump is the backup of both
            skipped[name] = f"same database as {seen[key]}"
            continue
        seen[key] = name
        found.append(db)
    return found, skipped


def stores(settings: Settings) -> dict[str, str]:
    """The object stores to copy: ``objects`` (the object root) and ``mlartifacts`` (MLflow's artifact root),
    the second only when it is not inside the first."""
    objects = settings.resolved_object_root.rstrip("/")
    artifacts = settings.resolved_artifact_root.rstrip("/")
    found = {"objects": objects}
    if _fs_path(artifacts) != _fs_path(objects) and not _fs_path(artifacts).startswith(_fs_path(objects) + "/"):
        found["mlartifacts"] = artifacts
    return found


def _fs_path(uri: str) -> str:
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    return f"{scheme}://{uri.split('://', 1)[-1].rstrip('/')}"


# ---- backup ---------------------------------------------------------------------------------------
def backup(settings: Settings, to: str | None = None) -> tuple[str, dict[str, Any]]:
    """Dump every database and copy every store into a new backup under ``to`` (default
    ``CTRAIN_BACKUP_URI``); returns its URI and manifest. A failed backup removes what it wrote."""
    started = time.monotonic()
    root = (to or settings.resolved_backup_uri).rstrip("/")
    dbs, skipped = databases(settings)
    sources = stores(settings)
    for store, uri in sources.items():
        if _fs_path(root).startswith(_fs_path(uri) + "/") or _fs_path(root) == _fs_path(uri):
            raise ConfigError(f"backup location {root} is inside the {store} store {uri}: a backup would copy "
                              "itself; set CTRAIN_BACKUP_URI (or --to) outside it")
    now = datetime.now(UTC)
    target = storage.join(root, f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}")
    fs, base = storage.open_fs(target, settings)
    try:
        manifest: dict[str, Any] = {
            "format": FORMAT, "created_at": now.isoformat(), "versions": _versions(),
            "databases": {db.name: _dump(db, fs, base) for db in dbs},
            "skipped_databases": skipped,
            "stores": {store: _copy_store(uri, fs, f"{base}/stores/{store}", settings)
                       for store, uri in sources.items()},
        }
        manifest["objects"] = {"count": sum(len(s["files"]) for s in manifest["stores"].values()),
                               "bytes": sum(f["bytes"] for s in manifest["stores"].values() for f in s["files"])}
        manifest["duration_s"] = round(time.monotonic() - started, 3)
        storage.write_bytes(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    except BaseException:
        if fs.exists(base):
            fs.rm(base, recursive=True)
        raise
    return target, manifest


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("apache-airflow", "mlflow", "feast", "ctrain"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    pg_dump = shutil.which("pg_dump")
    out["pg_dump"] = subprocess.run([pg_dump, "--version"], capture_output=True, text=True,
                                    check=True).stdout.strip() if pg_dump else "not installed"
    return out


def alembic_revision(db: Database) -> str | None:
    """The database's alembic revision: ``alembic_version`` (Airflow, MLflow tracking), else the one other
    ``alembic_version_*`` table (MLflow auth's ``alembic_version_auth``) as ``table:revision``; None for a
    schema alembic does not manage (Feast's registry)."""
    from psycopg2 import sql

    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename LIKE 'alembic\\_version%' ORDER BY tablename")
        tables = [row[0] for row in cur.fetchall()]
        revisions = []
        for table in tables:
            cur.execute(sql.SQL("SELECT version_num FROM {} ORDER BY version_num").format(sql.Identifier(table)))
            revision = ",".join(row[0] for row in cur.fetchall())
            revisions.append(revision if table == "alembic_version" else f"{table}:{revision}")
        return " ".join(revisions) or None


def _dump(db: Database, fs: AbstractFileSystem, base: str) -> dict[str, Any]:
    revision = alembic_revision(db)
    with tempfile.TemporaryDirectory(prefix="ctrain-backup-") as tmp:
        local = Path(tmp) / f"{db.name}.dump"
        _pg(["pg_dump", "--format=custom", "--no-owner", "--no-privileges", f"--file={local}"], db, db.dbname)
        digest, size = _sha256_file(local)
        fs.makedirs(f"{base}/databases", exist_ok=True)
        fs.put_file(str(local), f"{base}/databases/{db.name}.dump")
    log.info("dumped %s (%s): %d bytes", db.name, db.where(), size)
    return {"file": f"databases/{db.name}.dump", "sha256": digest, "bytes": size, "database": db.dbname,
            "server": f"{db.host}:{db.port}", "alembic_revision": revision}


def _pg(cmd: list[str], db: Database, dbname: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise ConfigError(f"{cmd[0]} is not on PATH: install the PostgreSQL client tools of the {db.name} "
                          "server's major version or newer (Debian: postgresql-client-<major>)")
    env = {**os.environ, **db.libpq_env(dbname)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise DataError(f"{cmd[0]} of the {db.name} database {db.host}:{db.port}/{dbname} failed "
                        f"(exit {out.returncode}): {out.stderr.strip()[-2000:]}")


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _list_files(uri: str, settings: Settings) -> tuple[AbstractFileSystem, str, list[str]]:
    """The store's filesystem, its root path and every object under it (relative paths, sorted)."""
    fs, root = storage.open_fs(uri, settings)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        found = []
    return fs, root, sorted(str(p)[len(root):].lstrip("/") for p in found)


def _copy_store(uri: str, fs: AbstractFileSystem, dest: str, settings: Settings) -> dict[str, Any]:
    src, root, names = _list_files(uri, settings)
    files = []
    for name in names:
        digest, size = _stream(src, f"{root}/{name}", fs, f"{dest}/{name}")
        files.append({"path": name, "bytes": size, "sha256": digest})
    log.info("copied %d objects of %s", len(files), uri)
    return {"uri": uri, "files": files}


def _stream(src_fs: AbstractFileSystem, src: str, dest_fs: AbstractFileSystem | None = None,
            dest: str | None = None, expect: dict[str, Any] | None = None) -> tuple[str, int]:
    """sha256 and size of the object ``src``, read in chunks (a checkpoint of any size passes in constant
    memory) and copied to ``dest`` when given. The copy appears whole or not at all (renamed into place
    locally; one completed upload on S3), and not at all when ``expect`` (size, sha256) does not match."""
    from fsspec.implementations.local import LocalFileSystem

    digest, size = hashlib.sha256(), 0
    local = isinstance(dest_fs, LocalFileSystem)
    target = f"{dest}.{os.getpid()}.partial" if local else dest
    if dest_fs is not None and dest is not None and local:
        dest_fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            reader = stack.enter_context(src_fs.open(src, "rb"))
            writer = stack.enter_context(dest_fs.open(target, "wb")) if dest_fs is not None else None
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if writer is not None:
                    writer.write(chunk)
        if expect is not None and (size, digest.hexdigest()) != (expect["bytes"], expect["sha256"]):
            if dest_fs is not None and not local:
                dest_fs.rm(dest)
            raise _Changed(src)
        if local:
            os.replace(str(target), str(dest))
    except BaseException:
        if local:
            Path(str(target)).unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


class _Changed(Exception):
    """An object's bytes did not match the manifest while it was copied."""


# ---- verify and restore -----------------------------------------------------------------------------
def read_manifest(uri: str, settings: Settings) -> dict[str, Any]:
    try:
        manifest = storage.read_json(storage.join(uri, MANIFEST), settings)
    except ValueError as exc:
        raise DataError(f"{storage.join(uri, MANIFEST)} is not JSON ({exc}): not a usable backup") from None
    if manifest is None:
        raise DataError(f"no {MANIFEST} at {uri}: not a complete backup (a backup writes it last)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{storage.join(uri, MANIFEST)}: unknown backup format "
                        f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r}, expected {FORMAT}")
    return manifest


def verify(uri: str, settings: Settings, keep_dumps: Path | None = None) -> dict[str, Any]:
    """Check the size and sha256 of every dump and object of the backup at ``uri`` against its manifest;
    raises DataError naming every file that does not match. ``keep_dumps``: a directory to leave the
    checked dumps in (restore uses them, so what it restores is what was checked)."""
    manifest = read_manifest(uri, settings)
    fs, base = storage.open_fs(uri, settings)
    from fsspec.implementations.local import LocalFileSystem

    checks = [(entry["file"], entry, f"{keep_dumps / name}.dump" if keep_dumps else None)
              for name, entry in manifest["databases"].items()]
    checks += [(f"stores/{store}/{entry['path']}", entry, None)
               for store, content in manifest["stores"].items() for entry in content["files"]]
    problems = []
    for path, entry, keep in checks:
        try:
            digest, size = _stream(fs, f"{base}/{path}", LocalFileSystem() if keep else None, keep)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {entry['bytes']}")
        elif digest != entry["sha256"]:
            problems.append(f"{path}: sha256 {digest}, manifest says {entry['sha256']}")
    if problems:
        raise DataError(f"backup {uri} is corrupt, {len(problems)} file(s) do not match {MANIFEST}: "
                        + "; ".join(problems) + ". Nothing was restored; use another backup.")
    return manifest


def restore(uri: str, settings: Settings, force: bool = False) -> dict[str, Any]:
    """Verify the backup at ``uri``, then recreate each of its databases where the current settings point
    and copy its objects back. Refuses (before changing anything) a database or store that holds data,
    unless ``force``. Returns the manifest."""
    current, _ = databases(settings)
    by_name = {db.name: db for db in current}
    targets = stores(settings)
    with tempfile.TemporaryDirectory(prefix="ctrain-restore-") as tmp:
        manifest = verify(uri, settings, keep_dumps=Path(tmp))
        missing = [f"the {n} database ({DATABASE_SOURCES[n]})" for n in manifest["databases"] if n not in by_name]
        missing += [f"the {s} store ({STORE_SOURCES[s]})" for s in manifest["stores"] if s not in targets]
        if missing:
            raise ConfigError(f"backup {uri} holds {'; '.join(missing)}, which the current environment does not "
                              "configure: set it to where that part is to be restored")
        if not force:
            busy = [f"the {n} database {by_name[n].where()} ({tables} tables)"
                    for n in manifest["databases"] if (tables := _table_count(by_name[n]))]
            busy += [f"the {s} store {targets[s]} ({count} objects)"
                     for s in manifest["stores"] if (count := len(_list_files(targets[s], settings)[2]))]
            if busy:
                raise ConfigError(f"restore refuses to overwrite {'; '.join(busy)}: pass --force to replace "
                                  "them with the backup (stop Airflow and MLflow first)")
        for name in manifest["databases"]:
            _restore_database(by_name[name], Path(tmp) / f"{name}.dump")
    fs, base = storage.open_fs(uri, settings)
    for store, content in manifest["stores"].items():
        dest_fs, dest = storage.open_fs(targets[store], settings)
        for entry in content["files"]:
            path = f"stores/{store}/{entry['path']}"
            try:
                _stream(fs, f"{base}/{path}", dest_fs, f"{dest}/{entry['path']}", expect=entry)
            except _Changed:
                raise DataError(f"backup {uri} changed during the restore: {path} no longer matches "
                                f"{MANIFEST}; restore again from an intact backup") from None
    return manifest


def _table_count(db: Database) -> int:
    """Tables outside the system schemas (0 when the database does not exist)."""
    with db.connect(dbname="postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.dbname,))
        if cur.fetchone() is None:
            return 0
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")
        return int(cur.fetchone()[0])


def _restore_database(db: Database, dump: Path) -> None:
    """Drop and recreate ``db``, then ``pg_restore`` the dump in one transaction (all or nothing)."""
    from psycopg2 import sql

    with db.connect(dbname="postgres", autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.dbname)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db.dbname)))
    _pg(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
         f"--dbname={db.dbname}", str(dump)], db, db.dbname)
    log.info("restored %s (%s)", db.name, db.where())


# ---- CLI ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from ctrain.errors import CtrainError
    from ctrain.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m ctrain.backup", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("backup", help="dump the databases and copy the object stores")
    make.add_argument("--to", help="backup location (directory or s3:// prefix); default CTRAIN_BACKUP_URI")
    check = commands.add_parser("verify", help="check every hash of a backup, restore nothing")
    check.add_argument("uri")
    back = commands.add_parser("restore", help="verify, then restore the databases and objects")
    back.add_argument("uri")
    back.add_argument("--force", action="store_true", help="replace databases and stores that hold data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    try:
        settings = get_settings()
        if args.command == "backup":
            uri, manifest = backup(settings, args.to)
        elif args.command == "verify":
            uri, manifest = args.uri, verify(args.uri, settings)
        else:
            uri, manifest = args.uri, restore(args.uri, settings, force=args.force)
    except CtrainError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 65 if not exc.retryable else 75
    print(json.dumps({"command": args.command, "backup": uri, "databases": sorted(manifest["databases"]),
                      "objects": manifest["objects"], "seconds": round(time.monotonic() - started, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
