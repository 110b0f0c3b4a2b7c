"""The embedded-defaults environment: Airflow on SQLite and all state under ``.ctrain/``.

``python -m ctrain.localenv`` prints the environment as shell ``export`` lines (``make up`` and a user's
shell use it), then the UI addresses and ``make up``'s patience as plain shell variables (``ui_host``,
``airflow_url``, ``mlflow_port``, ``mlflow_url``, ``up_timeout_s``) for ``scripts/up.sh``; :func:`airflow_env` gives the environment to
Python callers (the demo, the tests).
``python -m ctrain.localenv login`` creates the UI login if there is none and prints ``user password``.

The embedded UIs listen on ``CTRAIN_UI_HOST`` (default 127.0.0.1: this machine only) and Airflow asks
for a login: the simple auth manager's users ``CTRAIN_AIRFLOW_USERS`` (default ``admin`` (admin),
``approver`` (user: may trigger and answer the approvals assigned to it), ``viewer`` (read only)), each
with a generated password kept in ``{AIRFLOW_HOME}/simple_auth_manager_passwords.json.generated`` (mode
0600). ``CTRAIN_UI_HOST=0.0.0.0`` opens both UIs to the network on purpose; MLflow has no login of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
from typing import TYPE_CHECKING

from ctrain.settings import PROJECT_ROOT, Settings, get_settings

if TYPE_CHECKING:
    from pathlib import Path

UI_USER = "admin"
# Airflow's own alphabet for generated passwords (no look-alike characters).
_PASSWORD_ALPHABET = "abcdefghkmnpqrstuvwxyzABCDEFGHKMNPQRSTUVWXYZ23456789"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def password_file(settings: Settings) -> Path:
    """Where the simple auth manager keeps the UI passwords (one owner: this module sets the path)."""
    return settings.home / "airflow" / "simple_auth_manager_passwords.json.generated"


def local_address(settings: Settings) -> str:
    """The address local clients (the workers, ``make up``'s health check) reach the UIs on."""
    return "127.0.0.1" if settings.ui_host in {"0.0.0.0", "::", "", *_LOOPBACK} else settings.ui_host


def ui_urls(settings: Settings) -> dict[str, str]:
    """Where this machine reaches the embedded UIs: ``{"airflow": url, "mlflow": url}``."""
    host = local_address(settings)
    return {"airflow": f"http://{host}:{settings.airflow_port}", "mlflow": f"http://{host}:{settings.mlflow_port}"}


def airflow_env(settings: Settings) -> dict[str, str]:
    """Env vars that point Airflow at this checkout's DAGs and a SQLite metadata DB under ``home``."""
    airflow_home = settings.home / "airflow"
    api_url = ui_urls(settings)["airflow"]
    return {
        "CTRAIN_HOME": str(settings.home),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Login on: the CTRAIN_AIRFLOW_USERS, passwords generated into the file below (see ensure_logins).
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        # Roles are the simple auth manager's: viewer < user (trigger, answer assigned approvals) < op < admin.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(settings.airflow_users),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file(settings)),
        "AIRFLOW__API__HOST": settings.ui_host,
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "MLFLOW_TRACKING_URI": settings.resolved_tracking_uri,
    }


def ensure_logins(settings: Settings) -> dict[str, str]:
    """Every configured UI user's password (``{user: password}``), generated (and stored with mode 0600)
    for those that have none yet.

    Airflow would generate them too, but would also print them into the API server's log; created here,
    a password is shown only to whoever asks for it (``make up`` prints the admin's).
    """
    path = password_file(settings)
    passwords: dict[str, str] = json.loads(path.read_text() or "{}") if path.is_file() else {}
    users = [entry.split(":")[0] for entry in settings.airflow_users]
    missing = [user for user in users if not passwords.get(user)]
    for user in missing:
        passwords[user] = "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(16))
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(passwords) + "\n")
    path.chmod(0o600)
    return {user: passwords[user] for user in users}


def login_user(settings: Settings) -> str:
    """The user ``make up`` prints: the first admin of ``CTRAIN_AIRFLOW_USERS``."""
    admins = [entry.split(":")[0] for entry in settings.airflow_users if entry.endswith(":admin")]
    if not admins:
        from ctrain.errors import ConfigError

        raise ConfigError(f"CTRAIN_AIRFLOW_USERS={','.join(settings.airflow_users)} has no admin; "
                          f"add one, e.g. {UI_USER}:admin")
    return admins[0]


def ensure_login(settings: Settings) -> tuple[str, str]:
    """The login ``make up`` prints (:func:`login_user`) and its password; every user gets one."""
    user = login_user(settings)
    return user, ensure_logins(settings)[user]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings = get_settings()
    if args == ["login"]:
        user, password = ensure_login(settings)
        sys.stdout.write(f"{user} {password}\n")
        return
    if args:
        sys.exit(f"usage: python -m ctrain.localenv [login]; got {shlex.join(args)}")
    for key, value in airflow_env(settings).items():
        sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
    urls = ui_urls(settings)
    for key, value in {"ui_host": settings.ui_host, "airflow_url": urls["airflow"],
                       "mlflow_port": str(settings.mlflow_port), "mlflow_url": urls["mlflow"],
                       "up_timeout_s": str(settings.up_timeout_s)}.items():
        sys.stdout.write(f"{key}={shlex.quote(value)}\n")


if __name__ == "__main__":
    main()
