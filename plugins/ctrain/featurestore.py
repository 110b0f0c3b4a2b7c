"""Feast, in-process: the feature store of the settings' repo, ``feast apply``, the feature service's
definition hash, and the online store (materialization, serving reads).

The repo (``settings.feature_repo``) holds declarations only; paths come from :mod:`ctrain.settings` and
are passed to its ``feature_store.yaml`` and declaration files as ``CTRAIN_HOME`` and ``CTRAIN_DATA_ROOT``
(:func:`feast_env`); ``CTRAIN_FEAST_REGISTRY`` / ``CTRAIN_FEAST_ONLINE_STORE`` replace the yaml's registry
and online store (:func:`repo_config`: a SQL registry on Postgres, Redis in the production profile). Heavy libraries are imported inside functions so this module is cheap to import
from a DAG file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrain.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from feast import FeatureStore

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

# Feast objects read os.environ at load time; serialise the env swap so threads cannot interleave it.
_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def feast_env(settings: Settings) -> Iterator[None]:
    """Expose ctrain's paths to feature_store.yaml and definitions.py, restoring the env afterwards."""
    values = {"CTRAIN_HOME": str(settings.home), "CTRAIN_DATA_ROOT": str(settings.resolved_data_root)}
    with _ENV_LOCK:
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def feature_store(settings: Settings) -> FeatureStore:
    """A FeatureStore on the repo in ``settings.feature_repo`` with state under ``settings.home``."""
    from feast import FeatureStore

    repo = Path(settings.feature_repo)
    if not (repo / "feature_store.yaml").is_file():
        raise ConfigError(f"CTRAIN_FEATURE_REPO={repo}: no feature_store.yaml there")
    (Path(settings.home) / "feast").mkdir(parents=True, exist_ok=True)
    with feast_env(settings):
        if settings.feast_registry or settings.feast_online_store:
            return FeatureStore(repo_path=str(repo), config=repo_config(settings))
        return FeatureStore(repo_path=str(repo))


def repo_config(settings: Settings) -> Any:
    """The repo's ``feature_store.yaml`` with its registry and online store replaced by the settings'
    (``CTRAIN_FEAST_REGISTRY``: a SQL registry; ``CTRAIN_FEAST_ONLINE_STORE``: Redis), so one declaration
    repo serves the embedded defaults and the production profile.

    Passwords come from the environment at this point only (``PGPASSWORD`` is read by libpq itself,
    ``REDIS_PASSWORD`` is added to the connection string here): the settings never hold one, so nothing
    logged or stored from them does. Call under :func:`feast_env`.
    """
    import yaml
    from feast.repo_config import RepoConfig

    repo = Path(settings.feature_repo)
    raw = yaml.safe_load(os.path.expandvars((repo / "feature_store.yaml").read_text()))
    if settings.feast_registry:
        raw["registry"] = {"registry_type": "sql", "path": settings.feast_registry, "cache_ttl_seconds": 60,
                           "sqlalchemy_config_kwargs": {"pool_pre_ping": True}}
    if settings.feast_online_store:
        connection = settings.feast_online_store
        if os.environ.get("REDIS_PASSWORD"):
            connection += f",password={os.environ['REDIS_PASSWORD']}"
        raw["online_store"] = {"type": "redis", "connection_string": connection}
    config = RepoConfig(**raw)
    config.repo_path = repo
    return config


def load_repo_contents(repo: Path, project: str) -> Any:
    """The Feast objects declared in the repo's ``*.py`` files, parsed by Feast's own ``parse_repo``
    (so every kind it knows, ``Project`` and ``Permission`` included, is applied as ``feast apply`` would).

    Two things ``feast apply`` does around it are done here without its process-wide side effects:
    ``parse_repo`` imports each file by its module path relative to the working directory and
    Python then caches the module, so the repo's modules are imported fresh (from the repo's parent
    directory, and dropped from ``sys.modules`` again) and a second apply in the same process (another
    data root, a test) reads its own paths; and the repo's ``Project`` must be the one of
    ``feature_store.yaml`` (ConfigError, where the CLI would ``sys.exit``), or is added when there is none.
    Call under :func:`feast_env` (the declarations read ``CTRAIN_HOME``/``CTRAIN_DATA_ROOT``).
    """
    from feast.project import Project
    from feast.repo_operations import get_repo_files, parse_repo

    repo = repo.resolve()
    with _ENV_LOCK, _imported_fresh(repo.parent, _module_names(repo, get_repo_files(repo))):
        contents = parse_repo(repo)
    names = sorted({p.name for p in contents.projects})
    if not names:
        contents.projects.append(Project(name=project))
    elif names != [project]:
        raise ConfigError(f"feature repo {repo} declares Project(s) {names}, but its feature_store.yaml says "
                          f"project {project!r}; declare at most one Project, named as in feature_store.yaml")
    return contents


def _module_names(repo: Path, files: list[Path]) -> set[str]:
    """Module names ``parse_repo`` imports the repo's files under (from the repo's parent), with their
    parent packages."""
    names = set()
    for path in files:
        parts = path.relative_to(repo.parent).with_suffix("").parts
        names.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return names


@contextlib.contextmanager
def _imported_fresh(directory: Path, modules: set[str]) -> Iterator[None]:
    """Working directory and ``sys.path[0]`` at ``directory`` for the duration, and ``modules`` dropped
    from ``sys.modules`` before and after, so they are imported fresh and not kept."""
    import sys

    saved_cwd, saved_bytecode = os.getcwd(), sys.dont_write_bytecode
    for name in modules:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(directory))
    os.chdir(directory)
    sys.dont_write_bytecode = True  # as `feast apply`: no __pycache__ next to the declarations
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.dont_write_bytecode = saved_bytecode
        with contextlib.suppress(ValueError):
            sys.path.remove(str(directory))
        for name in modules:
            sys.modules.pop(name, None)


def apply_feature_repo(settings: Settings) -> None:
    """``feast apply`` the repo in-process: registry and online-store tables match the declarations.

    Idempotent (unchanged objects are left alone, so materialization intervals survive) and safe to call
    from every DAG run. Objects removed from the repo are removed from the registry, as with the CLI.
    """
    from feast.repo_operations import apply_total_with_repo_instance

    repo = Path(settings.feature_repo)
    with feast_env(settings):
        store = feature_store(settings)
        contents = load_repo_contents(repo, store.project)
        # Source validation only warns (and cannot resolve our date=* globs); data is checked at build time.
        apply_total_with_repo_instance(
            store, store.project, store.registry, contents, skip_source_validation=True
        )
    log.info("feast apply: project %s, registry under %s", store.project, settings.home)


def feature_service_hash(store: FeatureStore, service_name: str) -> tuple[Any, str]:
    """The FeatureService and a hash of everything that defines its values.

    Covers feature names and types, entities, TTLs and timestamp columns of every view it uses; leaves
    out registry timestamps and source paths (which differ between machines but not in meaning).
    """
    from feast.errors import FeatureServiceNotFoundException

    try:
        service = store.get_feature_service(service_name)
    except FeatureServiceNotFoundException as e:
        raise ConfigError(
            f"FeatureService {service_name!r} (the pipeline definition's feature_service) is not in the "
            "registry: run apply_feature_repo first or fix the name"
        ) from e
    views = []
    for proj in service.feature_view_projections:
        fv = store.get_feature_view(proj.name)
        src = fv.batch_source
        views.append({
            "name": proj.name,
            "features": [[f.name, str(f.dtype)] for f in proj.features],
            "entities": sorted(fv.entities),
            "join_keys": sorted(c.name for c in fv.entity_columns),
            "ttl_seconds": fv.ttl.total_seconds() if fv.ttl else None,
            "timestamp_field": src.timestamp_field if src else None,
            "created_timestamp_column": src.created_timestamp_column if src else None,
        })
    canon = json.dumps({"service": service.name, "views": views}, sort_keys=True)
    return service, hashlib.sha256(canon.encode()).hexdigest()


def materialize_incremental(settings: Settings, end: datetime | None = None) -> dict[str, list[list[str]]]:
    """Load the feature service's rows newer than the last materialization (up to ``end``, default now)
    into the online store.

    Feast keeps each view's materialized intervals in the registry, so repeated calls only load new rows.
    A view never materialized before is loaded from ``end - ttl`` (every row still valid at ``end``):
    Feast's own first interval starts at *now* - ttl, which would skip back-filled or replayed data.
    Returns each view's intervals (ISO strings). A landed feature file whose timestamps are not
    ``timestamp[us, tz=UTC]`` is refused first (``ctrain.timestamps``).
    """
    end = end or datetime.now(UTC)
    if end.tzinfo is None:
        raise ConfigError(f"end={end!r}: pass a timezone-aware datetime (UTC)")
    from ctrain.timestamps import check_feature_tables

    check_feature_tables(Path(settings.resolved_data_root), settings.definition.feature_tables)
    store = feature_store(settings)
    with feast_env(settings):
        # Only the views this pipeline's feature service reads: other pipelines' views share the Feast
        # project, and their data (or its absence) is not this pipeline's to load.
        service = store.get_feature_service(settings.feature_service)
        names = {projection.name for projection in service.feature_view_projections}
        views = [fv for fv in store.list_feature_views() if fv.name in names]
        incremental = []
        for fv in views:
            if fv.materialization_intervals:
                incremental.append(fv.name)
            else:
                store.materialize(start_date=end - (fv.ttl or timedelta(days=1)), end_date=end,
                                  feature_views=[fv.name])
        if incremental:
            store.materialize_incremental(end_date=end, feature_views=incremental)
        return {
            fv.name: [[s.isoformat(), e.isoformat()] for s, e in fv.materialization_intervals]
            for fv in store.list_feature_views()
            if fv.name in names
        }


def get_online_features(
    settings: Settings, entity_rows: list[dict[str, Any]], feature_service: str | None = None
) -> dict[str, list[Any]]:
    """Serving-time read of the FeatureService for ``entity_rows`` (one dict of join keys per row, e.g.
    ``[{"<entity column>": 1, ...}]``)."""
    store = feature_store(settings)
    with feast_env(settings):
        service = store.get_feature_service(feature_service or settings.feature_service)
        return store.get_online_features(features=service, entity_rows=entity_rows).to_dict()
