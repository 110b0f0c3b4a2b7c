"""Dataset snapshots: the immutable training set of a pipeline, its manifest, and the one verified reader.

``build_snapshot`` turns the labelled events landed under the data root into an immutable training set in
object storage (paths from :mod:`ctrain.layout`)::

    {object_root}/datasets/{dataset_version}/train.parquet, val.parquet, test.parquet, manifest.json

1. Events: every labelled event in the window (:func:`ctrain.landing.load_events`), as one Arrow table
   sorted by (event time, id). Column names, the label's kind and the event's own features come from the
   definition's ``events`` and ``task``.
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

Reading: :func:`read_splits` is the only reader of a snapshot's files in ctrain (evaluation, validation,
drift reference, demo); it checks every file's sha256 against the manifest. (The trainer image reads
snapshots with its own verified reader, ``trainer.data``.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ctrain import layout, storage
from ctrain.errors import ConfigError, DataError
from ctrain.featurestore import feast_env, feature_service_hash, feature_store
from ctrain.landing import (
    arrow_schema,
    feature_partitions,
    label_family,
    list_partitions,
    load_events,
    parse_day,
)
from ctrain.layout import MANIFEST, SPLITS

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from feast import FeatureStore

    from ctrain.definition import PipelineDefinition
    from ctrain.settings import Settings

log = logging.getLogger(__name__)

# Events per Feast point-in-time join call (see build_snapshot): bounds peak memory; each call costs
# ~0.15 s of fixed Feast/ibis overhead, so fewer, larger chunks are faster.
DEFAULT_CHUNK_ROWS = 125_000
# The last days of the window that become the test split, and the days before them the validation split.
DEFAULT_TEST_DAYS = 7
DEFAULT_VAL_DAYS = 7


@dataclass(frozen=True)
class SnapshotInfo:
    """A committed dataset snapshot. ``created`` is False when it already existed (nothing was written)."""

    dataset_version: str
    uri: str
    manifest: dict[str, Any]
    created: bool

def read_manifest(snapshot_uri: str, settings: Settings | None = None) -> dict[str, Any]:
    """The manifest of a committed snapshot (DataError if there is none: the snapshot is incomplete)."""
    try:
        manifest = storage.read_json(layout.manifest_uri(snapshot_uri), settings)
    except ValueError:
        raise DataError(f"{layout.manifest_uri(snapshot_uri)} is not JSON; delete the snapshot directory "
                        "and rebuild it") from None
    if manifest is None:
        raise DataError(
            f"{snapshot_uri} has no {MANIFEST}: not a committed snapshot (missing or half-written). "
            "Build it with ctrain.snapshot.build_snapshot."
        )
    return manifest


def read_splits(snapshot_uri: str, splits: tuple[str, ...] = SPLITS, columns: list[str] | None = None,
                settings: Settings | None = None) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """Manifest and the given splits of a committed snapshot as Arrow tables, each file's sha256 checked
    against the manifest before it is parsed (DataError on a mismatch: the snapshot was modified).

    ``columns`` reads only those columns (after the whole file's checksum)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(snapshot_uri, settings)
    tables = {}
    for split in splits:
        meta = manifest["splits"][split]
        data = storage.read_bytes(storage.join(snapshot_uri, meta["file"]), settings)
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise DataError(
                f"{snapshot_uri}/{meta['file']}: sha256 does not match the manifest; the snapshot was "
                "modified after it was written. Delete the snapshot directory and rebuild it."
            )
        tables[split] = pq.read_table(pa.BufferReader(data), columns=columns)
    return manifest, tables


def load_snapshot(snapshot_uri: str, splits: tuple[str, ...] = SPLITS, columns: list[str] | None = None,
                  settings: Settings | None = None) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """:func:`read_splits` as pandas frames, one per split."""
    manifest, tables = read_splits(snapshot_uri, splits, columns, settings)
    return manifest, {split: table.to_pandas() for split, table in tables.items()}


def read_frame(snapshot_uri: str, splits: tuple[str, ...] = SPLITS, columns: list[str] | None = None,
               settings: Settings | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`read_splits` concatenated in ``splits`` order as one DataFrame (one Arrow -> pandas
    conversion: a single consolidated frame, no copies)."""
    import pyarrow as pa

    manifest, tables = read_splits(snapshot_uri, splits, columns, settings)
    return manifest, pa.concat_tables([tables[s] for s in splits]).to_pandas()


def _or_all(masks: list[Any]) -> Any:
    import pyarrow.compute as pc

    out = masks[0]
    for m in masks[1:]:
        out = pc.or_(out, m)
    return out


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
    first, last = parse_day(start, "start"), parse_day(end, "end")
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
    with feast_env(settings):
        service, fs_hash = feature_service_hash(store, settings.feature_service)
        ttl = max((store.get_feature_view(p.name).ttl or timedelta(0)) for p in service.feature_view_projections)
        # checked before any split is written: a feature table of another timestamp unit is refused
        source_features = feature_partitions(data_root, definition.feature_tables, days, ttl)
        feature_columns = [*e.event_features,
                           *(f.name for p in service.feature_view_projections for f in p.features)]
        clash = sorted(set(feature_columns) & {e.id_column, e.timestamp_column, e.label_column, *e.entity_columns})
        if clash or len(set(feature_columns)) != len(feature_columns):
            raise ConfigError(f"feature service {service.name!r} and the events of pipeline {definition.name!r} "
                              f"name column(s) twice: {clash or feature_columns}; rename the feature(s)")
        columns = [e.id_column, *e.entity_columns, e.timestamp_column, *feature_columns, e.label_column]
        schema = arrow_schema({**{c: "integer" for c in (e.id_column, *e.entity_columns)},
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
    uri = layout.dataset_uri(settings.resolved_object_root, dataset_version)
    if storage.exists(layout.manifest_uri(uri), settings):
        log.info("snapshot %s already exists at %s; nothing written", dataset_version, uri)
        return SnapshotInfo(dataset_version, uri, read_manifest(uri, settings), created=False)

    splits_meta = {}
    for split in SPLITS:
        data, _ = encoded[split]
        storage.put_bytes(storage.join(uri, layout.split_file(split)), data, settings)
        splits_meta[split] = {
            "file": layout.split_file(split),
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
            "partitions": event_partitions + source_features,
        },
        "schema": {f.name: str(f.type) for f in schema},
        "feast_project": store.project,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # The manifest is the commit marker: written last, and only after every file it names.
    storage.put_bytes(layout.manifest_uri(uri), json.dumps(manifest, indent=2).encode(), settings)
    log.info("snapshot %s written to %s (%d rows)", dataset_version, uri, rows)
    return SnapshotInfo(dataset_version, uri, manifest, created=True)
