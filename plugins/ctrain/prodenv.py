"""The production profile on one host (``make up PROFILE=prod``, ``scripts/prod.sh``): Airflow on Postgres
with the LocalExecutor, an MLflow server with basic auth on Postgres and its artifacts in S3, Feast's SQL
registry on Postgres and its online store on Redis, an S3 endpoint (moto) on loopback, and the training
task in the training image (docker launcher, host network).

Postgres and Redis are existing servers (``CTRAIN_PROD_POSTGRES``, ``CTRAIN_PROD_REDIS``); everything else
is a native process ``scripts/prod.sh`` starts, with pids and logs under ``{home}/prod/``. This module owns
the profile's facts: database names, URLs, the environment of every component, and its secrets.

``python -m ctrain.prodenv COMMAND``:

- ``env``: ``export`` lines for the profile (no secret: the last line sources the secrets file), then
  plain shell variables for the script (``airflow_url``, ``mlflow_url``, ``s3_url``, ...).
- ``init``: the secrets file (generated once, mode 0600), the databases (created when missing), the
  MLflow auth config; prints nothing secret.
- ``bucket``: creates the bucket on the S3 endpoint (idempotent).
- ``purge``: drops the profile's databases and deletes its Feast project's keys from Redis.

Secrets (the MLflow admin password, the S3 keys, Airflow's JWT and Flask keys) live in
``{home}/prod/secrets.env`` and reach the components by environment only: never argv, logs or output.
A Postgres password is libpq's ``PGPASSWORD`` and a Redis one ``REDIS_PASSWORD``, taken from the caller's
environment; no URL here holds one.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from pathlib import Path

from ctrain.localenv import airflow_env, ensure_login, local_address
from ctrain.settings import Settings, get_settings

# The databases of the profile, {prefix}_{suffix}.
DATABASES = ("airflow", "mlflow", "mlflow_auth", "feast")
MLFLOW_USER = "admin"  # the server's admin: sets up permissions, nothing else signs in as it
# The pipeline signs in as this non-admin service account, the one user with MANAGE on the pipelines'
# registered models and experiments (``python -m ctrain.mlflow_auth setup``, run by scripts/prod.sh up).
SERVICE_USER = "ctrain-pipeline"
# The secrets file's variables: generated once, sourced by scripts/prod.sh, passed by environment only.
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
                "AIRFLOW__API__SECRET_KEY")


def prod_dir(settings: Settings) -> Path:
    return settings.home / "prod"


def secrets_file(settings: Settings) -> Path:
    return prod_dir(settings) / "secrets.env"


def database_url(settings: Settings, name: str) -> str:
    """SQLAlchemy URL of the profile's database ``name`` (one of :data:`DATABASES`), without a password."""
    return f"{settings.prod_postgres.rstrip('/')}/{settings.prod_db_prefix}_{name}"


def urls(settings: Settings) -> dict[str, str]:
    host = local_address(settings)
    return {"airflow": f"http://{host}:{settings.airflow_port}", "mlflow": f"http://{host}:{settings.mlflow_port}",
            "s3": f"http://127.0.0.1:{settings.prod_s3_port}"}


def prod_env(settings: Settings) -> dict[str, str]:
    """Every component's environment (secrets excepted): Airflow on Postgres with the LocalExecutor, and
    the ctrain settings that point the pipeline at the profile's MLflow, S3, Feast and the docker launcher."""
    u = urls(settings)
    env = airflow_env(settings)
    env.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url(settings, "airflow"),
        # No async engine: the lock has no async Postgres driver (asyncpg), and what needs one here is
        # only the dag-run "wait" endpoint and multi-team (unused); the rest of Airflow is synchronous.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "CTRAIN_OBJECT_ROOT": f"s3://{settings.prod_bucket}/objects",
        "CTRAIN_S3_ENDPOINT_URL": u["s3"],
        "CTRAIN_MLFLOW_TRACKING_URI": u["mlflow"],
        # Through the server (--serve-artifacts), which stores them under s3://{bucket}/mlflow.
        "CTRAIN_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/ctrain",
        "CTRAIN_FEAST_REGISTRY": database_url(settings, "feast"),
        "CTRAIN_FEAST_ONLINE_STORE": settings.prod_redis,
        "CTRAIN_LAUNCHER": "docker",
        "CTRAIN_DOCKER_NETWORK": "host",  # the container reaches MLflow and S3 on this host's loopback
        "MLFLOW_TRACKING_URI": u["mlflow"],
        "MLFLOW_TRACKING_USERNAME": SERVICE_USER,
        "MLFLOW_AUTH_CONFIG_PATH": str(prod_dir(settings) / "mlflow-auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
        "MLFLOW_S3_ENDPOINT_URL": u["s3"],
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    return env


def ensure_secrets(settings: Settings) -> dict[str, str]:
    """The profile's secrets, generated into :func:`secrets_file` (mode 0600) the first time."""
    path = secrets_file(settings)
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            if key in SECRET_NAMES:
                values[key] = shlex.split(value)[0] if value else ""
    if all(values.get(name) for name in SECRET_NAMES):
        return values
    password = values.get("MLFLOW_AUTH_ADMIN_PASSWORD") or secrets.token_urlsafe(18)
    generated = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        # the server creates its admin with this password; the pipeline's service account has its own
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(18),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(30),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(30),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(30),
    }
    values = {name: values.get(name) or generated[name] for name in SECRET_NAMES}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    path.chmod(0o600)
    return values


def _admin_connection(settings: Settings):
    """A psycopg2 connection to the server's ``postgres`` database, autocommit (CREATE/DROP DATABASE)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(settings.prod_postgres)
    try:
        conn = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, dbname="postgres",
                                connect_timeout=10)
    except psycopg2.OperationalError as exc:
        from ctrain.errors import ServiceUnavailable

        raise ServiceUnavailable(f"CTRAIN_PROD_POSTGRES={settings.prod_postgres}: cannot connect ({exc}); "
                                 "start Postgres or point the setting at yours (password: PGPASSWORD)") from None
    conn.autocommit = True
    return conn


def ensure_databases(settings: Settings) -> list[str]:
    """Create the profile's databases that do not exist yet; returns the ones created."""
    return _change_databases(settings, exists=False, statement='CREATE DATABASE "{}"')


def drop_databases(settings: Settings) -> list[str]:
    """Drop the profile's databases (after ``scripts/prod.sh down``); returns the ones dropped."""
    return _change_databases(settings, exists=True, statement='DROP DATABASE "{}" WITH (FORCE)')


def _change_databases(settings: Settings, exists: bool, statement: str) -> list[str]:
    """Run ``statement`` on each of the profile's databases that ``exists`` (or not); returns their names."""
    changed = []
    conn = _admin_connection(settings)
    try:
        with conn.cursor() as cur:
            for suffix in DATABASES:
                name = f"{settings.prod_db_prefix}_{suffix}"
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if (cur.fetchone() is not None) == exists:
                    cur.execute(statement.format(name))
                    changed.append(name)
    finally:
        conn.close()
    return changed


def delete_online_keys(settings: Settings) -> int:
    """Delete the Feast project's keys from the profile's Redis database; returns how many."""
    import redis
    import yaml

    host, _, rest = settings.prod_redis.partition(",")
    params = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
    hostname, _, port = host.partition(":")
    client = redis.Redis(host=hostname, port=int(port or 6379), db=int(params.get("db", 0)),
                         password=os.environ.get("REDIS_PASSWORD") or None)
    # Feast's Redis keys end with the project name (feature_store.yaml's project)
    project = str(yaml.safe_load((Path(settings.feature_repo) / "feature_store.yaml").read_text())["project"]).encode()
    keys = [k for k in client.scan_iter(count=1000) if project in k]
    if keys:
        client.delete(*keys)
    return len(keys)


def write_auth_config(settings: Settings) -> Path:
    """MLflow's basic-auth config: users and permissions on Postgres; the admin password comes from
    ``MLFLOW_AUTH_ADMIN_PASSWORD`` (the secrets file), not from this file."""
    path = prod_dir(settings) / "mlflow-auth.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_url(settings, 'mlflow_auth')}\n"
        f"admin_username = {MLFLOW_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def create_bucket(settings: Settings) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=urls(settings)["s3"])
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if settings.prod_bucket not in existing:
        s3.create_bucket(Bucket=settings.prod_bucket)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings = get_settings()
    if args == ["env"]:
        for key, value in prod_env(settings).items():
            sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
        sys.stdout.write(f"set -a; . {shlex.quote(str(secrets_file(settings)))}; set +a\n")
        u = urls(settings)
        for key, value in {"prod_dir": str(prod_dir(settings)), "ui_host": settings.ui_host,
                           "airflow_url": u["airflow"], "mlflow_url": u["mlflow"], "s3_url": u["s3"],
                           "mlflow_port": str(settings.mlflow_port), "s3_port": str(settings.prod_s3_port),
                           "bucket": settings.prod_bucket, "mlflow_backend": database_url(settings, "mlflow"),
                           "up_timeout_s": str(settings.up_timeout_s),
                           "training_image": settings.training_image}.items():
            sys.stdout.write(f"{key}={shlex.quote(value)}\n")
    elif args == ["init"]:
        ensure_secrets(settings)
        write_auth_config(settings)
        created = ensure_databases(settings)
        sys.stdout.write(f"databases: created {', '.join(created)}\n" if created else "databases: present\n")
    elif args == ["login"]:
        user, password = ensure_login(settings)
        sys.stdout.write(f"{user} {password}\n")
    elif args == ["bucket"]:
        create_bucket(settings)
    elif args == ["purge"]:
        dropped = drop_databases(settings)
        try:
            keys = delete_online_keys(settings)
        except Exception as exc:  # Redis down: the databases are gone all the same; say so
            sys.stdout.write(f"online store: not cleaned ({type(exc).__name__})\n")
        else:
            sys.stdout.write(f"online store: {keys} keys deleted\n")
        sys.stdout.write(f"databases: dropped {', '.join(dropped) or 'none'}\n")
    else:
        sys.exit(f"usage: python -m ctrain.prodenv env|init|login|bucket|purge; got {shlex.join(args)}")


if __name__ == "__main__":
    main()
