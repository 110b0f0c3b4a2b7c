"""Who may change the MLflow registry: on a basic-auth MLflow, the pipeline's service account alone has
MANAGE on each pipeline's registered model and experiment; people have READ.

The production profile runs ``mlflow server --app-name basic-auth``. Two commands set it up:

    python -m ctrain.mlflow_auth config /etc/mlflow/basic_auth.ini   # before the server starts
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini mlflow server --app-name basic-auth ...
    python -m ctrain.mlflow_auth setup                                # once the server is healthy

``config`` writes the auth config (mode 0600): ``default_permission = READ`` (anyone signed in who has no
grant may look, not change) and the users database (``--database-uri``, default SQLite next to the file);
the admin's name and password stay in ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD``, which
the server reads when it first creates its admin.

``setup`` (idempotent), as that admin, against ``CTRAIN_MLFLOW_TRACKING_URI``:

- creates the pipeline's service account, the user the pipeline signs in as (``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD``, the variables MLflow's client reads), not an admin;
- creates each pipeline's registered model (``model.name`` of every definition in ``CTRAIN_PIPELINES_DIR``)
  and experiment where missing, and grants the service account MANAGE on both;
- creates the people of ``CTRAIN_MLFLOW_READ_USERS_FILE`` (JSON ``{user: password}``, mode 0600) and grants
  each READ on the same models and experiments.

Passwords come from the environment and that file only: never from argv, never printed or logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrain.errors import ConfigError, ServiceUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

MANAGE, READ = "MANAGE", "READ"
ADMIN_USER_VAR, ADMIN_PASSWORD_VAR = "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"
SERVICE_USER_VAR, SERVICE_PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def _required_env(name: str, what: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"{name} is not set: it holds {what} (environment only; never argv or .env)")
    return value


def write_config(path: Path, database_uri: str | None = None) -> Path:
    """The server's auth config at ``path`` (mode 0600): default READ, users DB, no password in it."""
    database_uri = database_uri or f"sqlite:///{path.with_suffix('.db')}"
    text = (
        "[mlflow]\n"
        "# Written by `python -m ctrain.mlflow_auth config`. People get READ unless granted more; the\n"
        "# pipeline's service account gets MANAGE per model (`python -m ctrain.mlflow_auth setup`).\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        "# The admin's name and password come from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD.\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def read_users(path: Path | None) -> dict[str, str]:
    """``{user: password}`` of the READ people file; refused when others may read it or it is malformed."""
    if path is None:
        return {}
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"CTRAIN_MLFLOW_READ_USERS_FILE={path}: cannot read ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"CTRAIN_MLFLOW_READ_USERS_FILE={path} is readable by others (mode "
                          f"{stat.S_IMODE(mode):o}); it holds passwords: chmod 600 {path}")
    try:
        users = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"CTRAIN_MLFLOW_READ_USERS_FILE={path}: not JSON; expected "
                          '{"alice": "<password>", ...}') from None
    if not isinstance(users, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                              for k, v in users.items()):
        raise ConfigError(f"CTRAIN_MLFLOW_READ_USERS_FILE={path}: expected an object of non-empty user name "
                          "to non-empty password strings")
    return users


@contextlib.contextmanager
def signed_in_as(username: str, password: str) -> Iterator[None]:
    """MLflow's client credentials (read from the environment on every request) set for the duration."""
    saved = {k: os.environ.get(k) for k in (SERVICE_USER_VAR, SERVICE_PASSWORD_VAR)}
    os.environ[SERVICE_USER_VAR], os.environ[SERVICE_PASSWORD_VAR] = username, password
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_user(auth: Any, username: str, password: str) -> bool:
    """Create ``username`` (not an admin) unless it exists; True when created. An existing user keeps
    its password (rotate with MLflow's update-password API) but loses admin rights."""
    from mlflow.exceptions import RestException

    try:
        auth.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        return True
    auth.update_user_admin(username, False)
    return False


def setup(settings: Settings) -> dict[str, Any]:
    """Service account with MANAGE, people with READ, on every pipeline's model and experiment; returns a
    summary (names and permissions only)."""
    from mlflow.server import get_app_client

    from ctrain import registry
    from ctrain.definition import load_all
    from ctrain.settings import Settings

    uri = settings.resolved_tracking_uri
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"CTRAIN_MLFLOW_TRACKING_URI={uri}: permissions need an `mlflow server --app-name "
                          "basic-auth`; set it to the server's http(s) URL")
    admin = os.environ.get(ADMIN_USER_VAR) or "admin"
    admin_password = _required_env(ADMIN_PASSWORD_VAR, "the MLflow admin's password")
    service = _required_env(SERVICE_USER_VAR, "the pipeline's MLflow service account")
    service_password = _required_env(SERVICE_PASSWORD_VAR, "the service account's password")
    people = read_users(settings.mlflow_read_users_file)
    if service in people or service == admin:
        raise ConfigError(f"MLflow user {service!r} is the pipeline's service account; it cannot also be "
                          "the admin or a READ user")
    definitions = load_all(Path(settings.pipelines_dir))
    summary: dict[str, Any] = {"service_account": service, "created": [], "grants": []}
    with signed_in_as(admin, admin_password):
        auth = get_app_client("basic-auth", tracking_uri=uri)
        try:
            created = ensure_user(auth, service, service_password)
        except Exception as exc:
            raise ServiceUnavailable(f"MLflow auth API at {uri} refused or did not answer ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}); is it `mlflow server "
                                     f"--app-name basic-auth`, healthy, and {ADMIN_USER_VAR}/"
                                     f"{ADMIN_PASSWORD_VAR} its admin?") from None
        summary["created"] += [service] if created else []
        for person, password in sorted(people.items()):
            summary["created"] += [person] if ensure_user(auth, person, password) else []
        for name in sorted(definitions):
            pipeline_settings = Settings(**{f: getattr(settings, f) for f in Settings.model_fields if f != "pipeline"},
                                         pipeline=name)
            client = registry.get_client(pipeline_settings)
            model = pipeline_settings.model_name
            _ensure_registered_model(client, model, pipeline_settings.definition.model.description)
            experiment_id = registry.ensure_experiment(client, pipeline_settings)
            for username, permission in [(service, MANAGE), *((p, READ) for p in sorted(people))]:
                grant(auth, username, "registered_model", model, permission)
                grant(auth, username, "experiment", experiment_id, permission)
                summary["grants"].append({"user": username, "model": model, "experiment_id": experiment_id,
                                          "permission": permission})
    return summary


def grant(auth: Any, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Give ``username`` exactly ``permission`` on the resource (an earlier grant is replaced)."""
    from mlflow.exceptions import RestException

    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


def _ensure_registered_model(client: Any, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)


def main(argv: list[str] | None = None) -> None:
    from ctrain.settings import get_settings

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args[:1] == ["config"] and len(args) in (2, 4) and (len(args) == 2 or args[2] == "--database-uri"):
        path = write_config(Path(args[1]), args[3] if len(args) == 4 else None)
        sys.stdout.write(f"wrote {path} (mode 0600); start the server with MLFLOW_AUTH_CONFIG_PATH={path}\n")
        return
    if args == ["setup"]:
        summary = setup(get_settings())
        for grant in summary["grants"]:
            sys.stdout.write(f"{grant['user']}: {grant['permission']} on registered model {grant['model']} and "
                             f"experiment {grant['experiment_id']}\n")
        sys.stdout.write(f"created users: {', '.join(summary['created']) or 'none (all existed)'}\n")
        return
    sys.exit("usage: python -m ctrain.mlflow_auth config PATH [--database-uri URI] | setup")


if __name__ == "__main__":
    main()
