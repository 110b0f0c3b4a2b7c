"""Feast -> versioned dataset snapshot, for the pipeline that ``settings.definition`` describes.

``build_snapshot`` turns the labelled events landed under the data root into an immutable training set in
object storage::

    {object_root}/datasets/{dataset_version}/train.parquet, val.parquet, test.parquet, manifest.json

1. Events: every labelled event in the window (``{events.table}/date=*/*.parquet``), checked for the bad
   inputs listed under :func:`load_events`, as one Arrow table sorted by (event time, id). Column names,
   the label's kind and the event's own features come from the definition's ``events`` and ``task``.
2. Point-in-time join: ``FeatureStore.get_historical_features(entity_df, features=<FeatureService>)``
   (duckdb offline store) on consecutive slices of ``chunk_rows`` events, so memory follows the chunk
   rather than the window (the duckdb join needs ~0.6 KB per event); the event's own features
   (``events.event_features``) are feature columns too.
3. Time-based split: the last ``test_days`` days are test, the ``val_days`` before are validation, the
   rest is train. Each joined chunk is appended to its split's parquet file, encoded in memory while the
   next chunk is joined.
4. ``dataset_version`` = hash of the content (rows, columns, feature-definition hash, split boundaries), so
   the same inputs always give the same version, whatever the chunking. If that version already has a
   manifest, nothing is written. Otherwise the three parquet files are written and ``manifest.json`` last:
   a snapshot without a manifest does not exist (readers and re-runs treat it as absent).

Missing features (``validation.missing_features`` of the definition): an event whose entity has no feature
row within the view's TTL gets nulls from Feast. With ``fail`` (the default) such rows stay in the snapshot
with NaN and the GX gate's not-null expectations fail the run: when every entity gets a fresh aggregate row
daily, a miss means a feature partition is late or broken, which must stop training rather than be papered
over. ``drop`` removes those rows instead; either way the manifest records the count.

Landed tables are daily partitions ``{data_root}/{table}/date=YYYY-MM-DD/*.parquet`` (:func:`partition_dir`,
:func:`list_partitions`). Feast runs in-process (``apply_feature_repo``, ``feature_store``); paths come from
:mod:`ctrain.settings` and are passed to the repo's ``feature_store.yaml`` and declaration files as
``CTRAIN_HOME`` and ``CTRAIN_DATA_ROOT``. Heavy libraries (feast, pandas, pyarrow) are imported inside
functions so this module is cheap to import from a DAG file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ctrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd
    import pyarrow as pa
    from feast import FeatureStore
    from fsspec import AbstractFileSystem

    from ctrain.definition import PipelineDefinition
    from ctrain.settings import Settings

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# Events per Feast point-in-time join call (see build_snapshot): bounds peak memory; each call costs
# ~0.15 s of fixed Feast/ibis overhead, so fewer, larger chunks are faster.
DEFAULT_CHUNK_ROWS = 125_000
# The last days of the window that become the test split, and the days before them the validation split.
DEFAULT_TEST_DAYS = 7
DEFAULT_VAL_DAYS = 7

# The snapshot's canonical Arrow types; narrower ints or other timestamp units are cast to these.
_CANONICAL_TYPES = {"integer": "int64", "floating": "float64", "timestamp": "timestamp[us, tz=UTC]"}


def label_family(definition: PipelineDefinition) -> str:
    """Arrow type family of the label: integer class ids for classification, floating for regression."""
    return "floating" if definition.task.type == "regression" else "integer"


def events_schema(definition: PipelineDefinition) -> dict[str, str]:
    """Columns an events partition must have, in snapshot order, with the type family each must belong to."""
    e = definition.events
    return {
        e.id_column: "integer",
        **{k: "integer" for k in e.entity_columns},
        e.timestamp_column: "timestamp",
        **{f: "floating" for f in e.event_features},
        e.label_column: label_family(definition),
    }


def _arrow_schema(families: dict[str, str]) -> pa.Schema:
    import pyarrow as pa

    def arrow_type(family: str) -> Any:
        return pa.timestamp("us", tz="UTC") if family == "timestamp" else pa.type_for_alias(_CANONICAL_TYPES[family])

    return pa.schema([(c, arrow_type(f)) for c, f in families.items()])


# Feast objects read os.environ at load time; serialise the env swap so threads cannot interleave it.
_ENV_LOCK = threading.RLock()


@dataclass(frozen=True)
class SnapshotInfo:
    """A committed dataset snapshot. ``created`` is False when it already existed (nothing was written)."""

    dataset_version: str
    uri: str
    manifest: dict[str, Any]
    created: bool


# --------------------------------------------------------------------------------------------------
# Object storage
# --------------------------------------------------------------------------------------------------


def open_fs(uri: str, settings: Settings | None = None) -> tuple[AbstractFileSystem, str]:
    """fsspec filesystem and path for ``uri`` (``file://``, a local path, or ``s3://`` with the endpoint)."""
    import fsspec

    options: dict[str, Any] = {}
    if uri.startswith("s3://"):
        if settings is None:
            from ctrain.settings import get_settings

            settings = get_settings()
        if settings.s3_endpoint_url:
            options["client_kwargs"] = {"endpoint_url": settings.s3_endpoint_url}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one object so that readers see all of it or nothing (rename locally; one PUT on S3)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_manifest(snapshot_uri: str) -> dict[str, Any]:
    """The manifest of a committed snapshot (DataError if there is none: the snapshot is incomplete)."""
    fs, path = open_fs(snapshot_uri)
    mpath = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(mpath):
        raise DataError(
            f"{snapshot_uri} has no {MANIFEST}: not a committed snapshot (missing or half-written). "
            "Build it with ctrain.features.build_snapshot."
        )
    with fs.open(mpath, "rb") as f:
        return json.loads(f.read())


def load_snapshot(snapshot_uri: str, verify: bool = True) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Manifest and the three split frames of a snapshot; with ``verify`` every file's sha256 is checked."""
    import pandas as pd

    manifest = read_manifest(snapshot_uri)
    fs, path = open_fs(snapshot_uri)
    frames = {}
    for split, meta in manifest["splits"].items():
        with fs.open(f"{path.rstrip('/')}/{meta['file']}", "rb") as f:
            data = f.read()
        if verify and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise DataError(
                f"{snapshot_uri}/{meta['file']}: sha256 does not match the manifest; the snapshot was "
                "modified after it was written. Delete the snapshot directory and rebuild it."
            )
        frames[split] = pd.read_parquet(io.BytesIO(data))
    return manifest, frames


# --------------------------------------------------------------------------------------------------
# Feast
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _feast_env(settings: Settings) -> Iterator[None]:
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
    with _feast_env(settings):
        return FeatureStore(repo_path=str(repo))


def _load_repo_contents(repo: Path) -> Any:
    """Collect the Feast objects declared in the repo's ``*.py`` files.

    Like Feast's own ``parse_repo`` but loads each file fresh under a private module name: Feast's version
    imports by module path relative to the working directory and then caches the module, so a second apply
    in the same process (another data root, a test) would silently reuse the first one's paths.
    """
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.repo_contents import RepoContents
    from feast.stream_feature_view import StreamFeatureView

    found: dict[str, list[Any]] = {k: [] for k in ("sources", "entities", "fvs", "odfvs", "sfvs", "services")}

    def add(kind: str, obj: Any) -> None:
        if not any(o is obj for o in found[kind]):
            found[kind].append(obj)

    for path in sorted(repo.glob("*.py")):
        if path.name == "__init__.py":
            continue
        spec = importlib.util.spec_from_file_location(f"_ctrain_feature_repo.{path.stem}", path)
        assert spec and spec.loader  # a .py file always has a loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for obj in vars(module).values():
            if isinstance(obj, StreamFeatureView):
                add("sfvs", obj)
            elif isinstance(obj, FeatureView):
                add("fvs", obj)
                if obj.batch_source is not None:
                    add("sources", obj.batch_source)
            elif isinstance(obj, OnDemandFeatureView):
                add("odfvs", obj)
            elif isinstance(obj, DataSource):
                add("sources", obj)
            elif isinstance(obj, Entity):
                add("entities", obj)
            elif isinstance(obj, FeatureService):
                add("services", obj)
    return RepoContents(
        projects=[], data_sources=found["sources"], feature_views=found["fvs"],
        on_demand_feature_views=found["odfvs"], stream_feature_views=found["sfvs"], label_views=[],
        entities=found["entities"], feature_services=found["services"], permissions=[],
    )


def apply_feature_repo(settings: Settings) -> None:
    """``feast apply`` the repo in-process: registry and online-store tables match the declarations.

    Idempotent (unchanged objects are left alone, so materialization intervals survive) and safe to call
    from every DAG run. Objects removed from the repo are removed from the registry, as with the CLI.
    """
    from feast.project import Project
    from feast.repo_operations import apply_total_with_repo_instance

    repo = Path(settings.feature_repo)
    with _feast_env(settings):
        store = feature_store(settings)
        contents = _load_repo_contents(repo)
        contents.projects.append(Project(name=store.project))
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


# --------------------------------------------------------------------------------------------------
# Entity frame
# --------------------------------------------------------------------------------------------------


def _type_family(t: Any) -> str:
    import pyarrow.types as pat

    if pat.is_integer(t):
        return "integer"
    if pat.is_floating(t):
        return "floating"
    if pat.is_timestamp(t):
        return "timestamp"
    return str(t)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def partition_dir(data_root: Path, table: str, day: date) -> Path:
    """Directory of one daily partition of a landed table: ``{data_root}/{table}/date=YYYY-MM-DD``."""
    return Path(data_root) / table / f"date={day.isoformat()}"


def list_partitions(data_root: Path, table: str) -> list[date]:
    """Dates that have a partition (a ``date=YYYY-MM-DD`` directory with a parquet file) of ``table``, sorted."""
    base = Path(data_root) / table
    if not base.is_dir():
        return []
    days = []
    for d in base.glob("date=*"):
        if d.is_dir() and any(d.glob("*.parquet")):
            day = _parse_day(d.name.removeprefix("date="), f"{base}/{d.name}")
            assert day is not None  # a non-empty string parses or raises
            days.append(day)
    return sorted(days)


def load_events(
    settings: Settings, days: list[date], now: datetime | None = None
) -> tuple[pa.Table, list[dict[str, Any]], int]:
    """The labelled events of ``days`` (table and columns: ``settings.definition.events``) as one Arrow
    table sorted by (event time, id), plus the partitions read and the duplicates dropped.

    Bad inputs fail with DataError naming the partition file, the column and the fix; nothing is written
    by the caller:

    - an empty partition (0 rows), a missing column, a column of the wrong type (:func:`events_schema`:
      ids and entity keys integer, the timestamp a UTC timestamp, event features floating, the label
      integer for classification and floating for regression), a null id/key/timestamp/label, a label
      that is not a class (binary: 0 or 1; multiclass: 0..num_classes-1) or a NaN/infinite target: the
      partition is broken (nulls in event features are data quality, left to the GX gate);
    - an event outside its partition's date, or later than ``now``: the clock or the partitioning is wrong;
    - the same id twice with different content: conflicting deliveries.

    Documented handling: rows repeated verbatim (e.g. the same file delivered twice into one date
    directory) are dropped and counted; the manifest records the count.

    Each file is read once: its sha256 (for the manifest) is taken from the same bytes that are parsed.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    definition = settings.definition
    e = definition.events
    data_root = Path(settings.resolved_data_root)
    families = events_schema(definition)
    schema = _arrow_schema(families)
    order = [(e.timestamp_column, "ascending"), (e.id_column, "ascending")]
    now = now or datetime.now(UTC)
    day_tables, partitions, duplicates = [], [], 0
    for day in days:
        part_dir = partition_dir(data_root, e.table, day)
        files = sorted(part_dir.glob("*.parquet"))
        if not files:
            raise DataError(f"{part_dir}: no parquet file in the {e.table} partition for {day}")
        tables = []
        for path in files:
            data = path.read_bytes()
            try:
                table = pq.read_table(pa.BufferReader(data))
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"{path}: not a readable parquet file ({exc}); re-deliver the partition") from exc
            _check_partition(path, table, day, now, definition, families)
            partitions.append({
                "table": e.table, "date": day.isoformat(),
                "path": str(path.relative_to(data_root)), "rows": table.num_rows,
                "sha256": hashlib.sha256(data).hexdigest(),
            })
            tables.append(table.select(list(families)).cast(schema))
        table = pa.concat_tables(tables)
        # A verbatim repeat has the same event time, hence the same day: duplicates are found per day.
        if pc.count_distinct(table.column(e.id_column)).as_py() != table.num_rows:
            deduped = pa.Table.from_pandas(table.to_pandas().drop_duplicates(), preserve_index=False)
            duplicates += table.num_rows - deduped.num_rows
            table = deduped.cast(schema)
        # Partitions cover disjoint days, so sorting each day sorts the whole window.
        if not _is_sorted(table, e.timestamp_column, e.id_column):
            table = table.take(pc.sort_indices(table, order))
        day_tables.append(table)
    events = pa.concat_tables(day_tables).combine_chunks()

    ids = events.column(e.id_column)
    sorted_ids = np.sort(ids.to_numpy())  # a sort is several times faster than hashing 1e6 ids here
    if (sorted_ids[1:] == sorted_ids[:-1]).any():
        counts = pc.value_counts(ids)
        clash = counts.filter(pc.greater(counts.field("counts"), 1))
        raise DataError(
            f"{e.id_column} not unique in {e.table}: {len(clash)} id(s) occur in rows with different content "
            f"(e.g. {clash.field('values')[:5].to_pylist()}); the same event was delivered twice with "
            "different values. Remove the wrong copy."
        )
    if duplicates:
        log.warning("dropped %d verbatim duplicate %s rows", duplicates, e.table)
    return events, partitions, duplicates


def _is_sorted(table: pa.Table, ts_column: str, id_column: str) -> bool:
    """Whether rows are in (event time, id) order (producers usually write them so; sorting is then skipped)."""
    import pyarrow.compute as pc

    if table.num_rows < 2:
        return True
    ts, ids = table.column(ts_column), table.column(id_column)
    t0, t1 = ts.slice(0, len(ts) - 1), ts.slice(1)
    in_order = pc.or_(pc.less(t0, t1), pc.and_(pc.equal(t0, t1), pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))))
    return bool(pc.all(in_order).as_py())


def _check_partition(path: Path, table: Any, day: date, now: datetime, definition: PipelineDefinition,
                     families: dict[str, str]) -> None:
    import pyarrow.compute as pc

    e, task = definition.events, definition.task
    if table.num_rows == 0:
        raise DataError(
            f"{path}: empty partition (0 rows). An empty day means the upstream export failed; "
            "re-deliver it or delete the partition to exclude the day."
        )
    for col, family in families.items():
        if col not in table.column_names:
            raise DataError(f"{path}: missing column {col!r} (has {table.column_names})")
        got = _type_family(table.schema.field(col).type)
        if got != family:
            raise DataError(
                f"{path}: column {col!r} has type {table.schema.field(col).type}, expected {family}; "
                "fix the producer's schema"
            )
        nulls = table.column(col).null_count
        if nulls and col not in e.event_features:  # event-feature nulls are data quality, left to the GX gate
            raise DataError(f"{path}: column {col!r} has {nulls} null(s); ids, keys, time and label are required")
    label = table.column(e.label_column)
    if task.type == "regression":
        bad = int(pc.sum(pc.invert(pc.is_finite(label))).as_py() or 0)
        if bad:
            raise DataError(f"{path}: column {e.label_column!r} (the target) has {bad} NaN or infinite value(s)")
    else:
        classes = set(range(task.num_classes or 2))
        values = pc.unique(label).to_pylist()
        if not set(values) <= classes:
            raise DataError(f"{path}: column {e.label_column!r} values {sorted(values)}; expected only class ids "
                            f"{min(classes)}..{max(classes)} ({task.type} task)")
    ts = table.column(e.timestamp_column)
    if ts.type.tz is None:
        raise DataError(f"{path}: column {e.timestamp_column!r} has no time zone; write timestamps in UTC (tz='UTC')")
    lo, hi = pc.min(ts).as_py(), pc.max(ts).as_py()
    if hi > now:
        raise DataError(
            f"{path}: column {e.timestamp_column!r}: {hi.isoformat()} is in the future (now {now.isoformat()}); "
            "the producer's clock or time zone is wrong"
        )
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    if lo < start or hi >= start + timedelta(days=1):
        raise DataError(
            f"{path}: column {e.timestamp_column!r}: events from {lo.isoformat()} to {hi.isoformat()} are "
            f"outside the partition's date {day}; partition by UTC event date"
        )


# --------------------------------------------------------------------------------------------------
# Snapshot
# --------------------------------------------------------------------------------------------------


def _or_all(masks: list[Any]) -> Any:
    import pyarrow.compute as pc

    out = masks[0]
    for m in masks[1:]:
        out = pc.or_(out, m)
    return out


def _parse_day(value: date | str | None, name: str) -> date | None:
    if value is None or isinstance(value, date):
        return value.date() if isinstance(value, datetime) else value
    try:
        return date.fromisoformat(value)
    except ValueError as e:
        raise ConfigError(f"{name}={value!r}: expected YYYY-MM-DD") from e


def check_window(
    settings: Settings,
    start: date | str | None = None,
    end: date | str | None = None,
    val_days: int = DEFAULT_VAL_DAYS,
    test_days: int = DEFAULT_TEST_DAYS,
) -> list[date]:
    """The landed days from ``start`` to ``end`` (inclusive; default: all), enough to split.

    Reads directory names only and writes nothing, so a caller can refuse a bad window before any side
    effect (``feast apply``, a snapshot). ConfigError/DataError name ``start``/``end`` (the DAG's Params)
    and the fix: an inverted window, one with no landed data, or one too short for train/val/test.
    """
    if val_days < 1 or test_days < 1:
        raise ConfigError(f"val_days={val_days}, test_days={test_days}: each must be >= 1")
    data_root = Path(settings.resolved_data_root)
    first, last = _parse_day(start, "start"), _parse_day(end, "end")
    if first and last and last < first:
        raise ConfigError(f"start={first} is after end={last}: set start on or before end (both inclusive, YYYY-MM-DD)")
    table = settings.definition.events.table
    available = list_partitions(data_root, table)
    if not available:
        raise DataError(
            f"no {table} partitions under {data_root / table} (pipeline {settings.definition.name}); land "
            f"them as {table}/date=YYYY-MM-DD/*.parquet (an example pipeline's generator is its "
            "example.datagen) or set CTRAIN_DATA_ROOT"
        )
    first, last = first or available[0], last or available[-1]
    days = [d for d in available if first <= d <= last]
    if not days:
        raise DataError(
            f"no {table} partitions between start={first} and end={last}: data has landed for "
            f"{available[0]}..{available[-1]}; choose a window inside it (or leave start/end empty for all of it)"
        )
    if len(days) < val_days + test_days + 1:
        raise ConfigError(
            f"window start={days[0]}..end={days[-1]} has {len(days)} landed day(s); need more than "
            f"val_days + test_days = {val_days + test_days} to leave a training split: widen the window"
        )
    return days


class _SplitWriter:
    """One split's parquet file, encoded in memory chunk by chunk, with its content digest and stats.

    The digest is the hash of the split's logical content (column names, types, and each column's values
    as numpy bytes, nulls as NaN/NaT), so it depends neither on the parquet writer's version or settings
    nor on how the rows were chunked: each column has its own running hash, combined at the end.
    """

    def __init__(self, schema: pa.Schema, positives_of: str | None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = schema
        self._sink = pa.BufferOutputStream()
        self._writer = pq.ParquetWriter(self._sink, schema, compression="snappy")
        self._hashes = [hashlib.sha256() for _ in schema]
        self.rows = 0
        self._positives_of = positives_of  # binary label column: count its ones for the label rate
        self.labels = 0

    def write(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        if not table.num_rows:
            return
        self._writer.write_table(table)
        for h, col in zip(self._hashes, table.columns, strict=True):
            h.update(col.to_numpy().tobytes())
        self.rows += table.num_rows
        if self._positives_of:
            self.labels += int(pc.sum(table.column(self._positives_of)).as_py() or 0)

    def close(self) -> tuple[bytes, str]:
        """The parquet file's bytes and the content digest."""
        self._writer.close()
        h = hashlib.sha256(json.dumps([[f.name, str(f.type)] for f in self.schema]).encode())
        for col_hash in self._hashes:
            h.update(col_hash.digest())
        return self._sink.getvalue().to_pybytes(), h.hexdigest()

    @property
    def label_rate(self) -> float | None:
        """Positive rate of a binary label (None for other tasks or no rows)."""
        return round(self.labels / self.rows, 6) if self.rows and self._positives_of else None


def _write_parts(parts: list[tuple[_SplitWriter, pa.Table]]) -> None:
    for writer, table in parts:
        writer.write(table)


def _join_chunk(store: FeatureStore, service: Any, events: pa.Table, schema: pa.Schema,
                definition: PipelineDefinition) -> pa.Table:
    """Feast point-in-time join of one chunk of events (sorted by time, id); the result in the same order.

    Only the ids, entity keys and event times go to Feast (they are all the join needs); the event's own
    columns (event features, label) are put back by position after checking that the ids line up.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    e = definition.events
    keys = events.select([e.id_column, *e.entity_columns, e.timestamp_column])
    joined = store.get_historical_features(entity_df=keys.to_pandas(), features=service).to_arrow()
    if joined.num_rows != events.num_rows:
        raise DataError(f"point-in-time join returned {joined.num_rows} rows for {events.num_rows} events")
    joined = joined.take(pc.sort_indices(joined, [(e.timestamp_column, "ascending"), (e.id_column, "ascending")]))
    if not pc.all(pc.equal(joined.column(e.id_column), events.column(e.id_column))).as_py():
        raise DataError(f"point-in-time join returned other {e.id_column} values than it was given")
    columns = {name: (events if name in events.column_names and name not in joined.column_names else joined)
               .column(name) for name in schema.names}
    return pa.table(columns).cast(schema)


def _feature_partitions(data_root: Path, tables: list[str], days: list[date],
                        lookback: timedelta) -> list[dict[str, Any]]:
    """Partitions of the feature-source ``tables`` that can have fed the window (its days plus the TTL
    look-back), each checked for the timestamp type (``ctrain.timestamps``)."""
    from ctrain.timestamps import check_feature_file

    lo = days[0] - timedelta(days=lookback.days + 1)
    out = []
    for table in tables:
        for day in list_partitions(data_root, table):
            if lo <= day <= days[-1]:
                for path in sorted(partition_dir(data_root, table, day).glob("*.parquet")):
                    check_feature_file(path)
                    out.append({"table": table, "date": day.isoformat(),
                                "path": str(path.relative_to(data_root)), "sha256": _sha256_file(path)})
    return out


def build_snapshot(
    settings: Settings,
    start: date | str | None = None,
    end: date | str | None = None,
    val_days: int = DEFAULT_VAL_DAYS,
    test_days: int = DEFAULT_TEST_DAYS,
    missing_features: Literal["fail", "drop"] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> SnapshotInfo:
    """Build (or find) the snapshot of the pipeline's labelled events (``settings.definition``) from
    ``start`` to ``end`` (inclusive dates).

    Defaults cover every landed partition; ``missing_features`` defaults to the definition's
    ``validation.missing_features``. Returns the committed snapshot; ``created`` says whether this
    call wrote it. Raises DataError/ConfigError on bad input, before anything is written.

    ``chunk_rows`` bounds the events per Feast call: the point-in-time join runs on consecutive time
    slices of the events, each result is appended to its split's parquet file (in memory) and dropped,
    so peak memory follows the chunk, not the window. Each event's join is independent of the others,
    so the result does not depend on the chunking (nor does ``dataset_version``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    definition = settings.definition
    e, task = definition.events, definition.task
    missing_features = missing_features or definition.validation.missing_features
    if missing_features not in ("fail", "drop"):
        raise ConfigError(f"missing_features={missing_features!r}: expected 'fail' or 'drop'")
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows={chunk_rows}: must be >= 1")
    data_root = Path(settings.resolved_data_root)
    days = check_window(settings, start, end, val_days, test_days)

    events, event_partitions, duplicates = load_events(settings, days)

    # Time-based split by UTC event date; events are sorted by time, so each split is a row range.
    test_from, val_from = days[-test_days], days[-(test_days + val_days)]
    ts = events.column(e.timestamp_column)

    def first_row_on_or_after(day: date) -> int:
        cut = pa.scalar(datetime.combine(day, datetime.min.time(), tzinfo=UTC), pa.timestamp("us", tz="UTC"))
        return int(pc.sum(pc.less(ts, cut)).as_py() or 0)

    i_val, i_test = first_row_on_or_after(val_from), first_row_on_or_after(test_from)
    ranges = {"train": (0, i_val), "val": (i_val, i_test), "test": (i_test, events.num_rows)}
    bounds = {"train": (days[0], days[-(test_days + val_days) - 1]),
              "val": (val_from, days[-test_days - 1]), "test": (test_from, days[-1])}

    store = feature_store(settings)
    with _feast_env(settings):
        service, fs_hash = feature_service_hash(store, settings.feature_service)
        ttl = max((store.get_feature_view(p.name).ttl or timedelta(0)) for p in service.feature_view_projections)
        feature_partitions = _feature_partitions(data_root, definition.feature_tables, days, ttl)  # checked
        feature_columns = [*e.event_features,
                           *(f.name for p in service.feature_view_projections for f in p.features)]
        clash = sorted(set(feature_columns) & {e.id_column, e.timestamp_column, e.label_column, *e.entity_columns})
        if clash or len(set(feature_columns)) != len(feature_columns):
            raise ConfigError(f"feature service {service.name!r} and the events of pipeline {definition.name!r} "
                              f"name column(s) twice: {clash or feature_columns}; rename the feature(s)")
        columns = [e.id_column, *e.entity_columns, e.timestamp_column, *feature_columns, e.label_column]
        schema = _arrow_schema({**{c: "integer" for c in (e.id_column, *e.entity_columns)},
                                e.timestamp_column: "timestamp", **{c: "floating" for c in feature_columns},
                                e.label_column: label_family(definition)})
        positives_of = e.label_column if task.type == "binary" else None
        writers = {split: _SplitWriter(schema, positives_of) for split in SPLITS}
        n_missing = 0
        # Encoding a chunk (parquet + hashes, GIL released) overlaps with the next chunk's Feast call,
        # whose Python part (plan, compile) leaves a core idle. One chunk in flight bounds the memory.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrain-snapshot-writer") as pool:
            pending: Future[None] | None = None
            for offset in range(0, events.num_rows, chunk_rows):
                chunk = _join_chunk(store, service, events.slice(offset, chunk_rows), schema, definition)
                missing = _or_all([pc.is_null(chunk.column(c), nan_is_null=True) for c in feature_columns])
                n_missing += int(pc.sum(missing).as_py() or 0)
                # The chunk is in event order, so its rows of each split are a contiguous range.
                parts = []
                for split, (lo, hi) in ranges.items():
                    a, b = max(lo - offset, 0), min(hi - offset, chunk.num_rows)
                    if a < b:
                        part = chunk.slice(a, b - a)
                        if missing_features == "drop":
                            part = part.filter(pc.invert(missing.slice(a, b - a)))
                        parts.append((writers[split], part))
                if pending is not None:
                    pending.result()
                pending = pool.submit(_write_parts, parts)
                del chunk, missing, parts
            if pending is not None:
                pending.result()
    del events
    if n_missing and missing_features == "drop":
        log.warning("dropped %d rows with missing features (TTL expired or null values)", n_missing)
    encoded = {split: writers[split].close() for split in SPLITS}

    version_src = {
        "feature_service": service.name, "feature_service_hash": fs_hash, "columns": columns,
        "task": task.model_dump(), "missing_features": missing_features,
        "splits": {s: [encoded[s][1], str(bounds[s][0]), str(bounds[s][1])] for s in SPLITS},
    }
    dataset_version = hashlib.sha256(json.dumps(version_src, sort_keys=True).encode()).hexdigest()[:16]
    uri = f"{settings.resolved_object_root.rstrip('/')}/datasets/{dataset_version}"
    fs, base = open_fs(uri, settings)
    if fs.exists(f"{base}/{MANIFEST}"):
        log.info("snapshot %s already exists at %s; nothing written", dataset_version, uri)
        return SnapshotInfo(dataset_version, uri, read_manifest(uri), created=False)

    splits_meta = {}
    for split in SPLITS:
        data, _ = encoded[split]
        write_bytes(fs, f"{base}/{split}.parquet", data)
        splits_meta[split] = {
            "file": f"{split}.parquet",
            "sha256": hashlib.sha256(data).hexdigest(),
            "rows": writers[split].rows,
            "label_rate": writers[split].label_rate,
            "start": bounds[split][0].isoformat(),
            "end": bounds[split][1].isoformat(),
        }
    rows = sum(w.rows for w in writers.values())
    labels = sum(w.labels for w in writers.values())
    manifest = {
        "dataset_version": dataset_version,
        "feature_service": service.name,
        "feature_service_hash": fs_hash,
        "feature_columns": feature_columns,
        "label_column": e.label_column,
        "id_column": e.id_column,
        "timestamp_column": e.timestamp_column,
        "entity_columns": list(e.entity_columns),
        "task": task.type,
        "num_classes": task.num_classes,
        "pipeline": definition.name,
        "entity_window": {"start": days[0].isoformat(), "end": days[-1].isoformat()},
        "splits": splits_meta,
        "rows": rows,
        "label_rate": round(labels / rows, 6) if rows and positives_of else None,
        "missing_features": {"handling": missing_features, "rows": n_missing},
        "duplicates_dropped": duplicates,
        "source_partitions": {
            "data_root": str(data_root),
            "partitions": event_partitions + feature_partitions,
        },
        "schema": {f.name: str(f.type) for f in schema},
        "feast_project": store.project,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # The manifest is the commit marker: written last, and only after every file it names.
    write_bytes(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    log.info("snapshot %s written to %s (%d rows)", dataset_version, uri, rows)
    return SnapshotInfo(dataset_version, uri, manifest, created=True)


# --------------------------------------------------------------------------------------------------
# Online store
# --------------------------------------------------------------------------------------------------


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
    with _feast_env(settings):
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
    with _feast_env(settings):
        service = store.get_feature_service(feature_service or settings.feature_service)
        return store.get_online_features(features=service, entity_rows=entity_rows).to_dict()
