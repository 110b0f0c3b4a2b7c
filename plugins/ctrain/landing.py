"""Landed data: the daily partitions of a pipeline's tables and the labelled events read from them.

A landed table is ``{data_root}/{table}/date=YYYY-MM-DD/*.parquet`` (:mod:`ctrain.layout`); the events
table and its columns are the pipeline definition's ``events``. :func:`load_events` reads a window of
event partitions as one Arrow table, refusing bad inputs with errors that name the file, the column and
the fix; :func:`feature_partitions` lists the feature-source files that can have fed a window (for the
snapshot manifest). Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrain import layout
from ctrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pyarrow as pa

    from ctrain.definition import PipelineDefinition
    from ctrain.settings import Settings

log = logging.getLogger(__name__)

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


def arrow_schema(families: dict[str, str]) -> pa.Schema:
    import pyarrow as pa

    def arrow_type(family: str) -> Any:
        return pa.timestamp("us", tz="UTC") if family == "timestamp" else pa.type_for_alias(_CANONICAL_TYPES[family])

    return pa.schema([(c, arrow_type(f)) for c, f in families.items()])


def _type_family(t: Any) -> str:
    import pyarrow.types as pat

    if pat.is_integer(t):
        return "integer"
    if pat.is_floating(t):
        return "floating"
    if pat.is_timestamp(t):
        return "timestamp"
    return str(t)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_partitions(data_root: Path, table: str) -> list[date]:
    """Dates that have a partition (a ``date=YYYY-MM-DD`` directory with a parquet file) of ``table``, sorted."""
    base = layout.table_dir(data_root, table)
    if not base.is_dir():
        return []
    days = []
    for d in base.glob(f"{layout.PARTITION_PREFIX}*"):
        if d.is_dir() and any(d.glob("*.parquet")):
            day = parse_day(d.name.removeprefix(layout.PARTITION_PREFIX), f"{base}/{d.name}")
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
    schema = arrow_schema(families)
    order = [(e.timestamp_column, "ascending"), (e.id_column, "ascending")]
    now = now or datetime.now(UTC)
    day_tables, partitions, duplicates = [], [], 0
    for day in days:
        part_dir = layout.partition_dir(data_root, e.table, day)
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


def parse_day(value: date | str | None, name: str) -> date | None:
    if value is None or isinstance(value, date):
        return value.date() if isinstance(value, datetime) else value
    try:
        return date.fromisoformat(value)
    except ValueError as e:
        raise ConfigError(f"{name}={value!r}: expected YYYY-MM-DD") from e


def feature_partitions(data_root: Path, tables: list[str], days: list[date],
                       lookback: timedelta) -> list[dict[str, Any]]:
    """Partitions of the feature-source ``tables`` that can have fed the window (its days plus the TTL
    look-back), each with its file's sha256 and checked for the timestamp type (``ctrain.timestamps``)."""
    from ctrain.timestamps import check_feature_file

    lo = days[0] - timedelta(days=lookback.days + 1)
    out = []
    for table in tables:
        for day in list_partitions(data_root, table):
            if lo <= day <= days[-1]:
                for path in sorted(layout.partition_dir(data_root, table, day).glob("*.parquet")):
                    check_feature_file(path)
                    out.append({"table": table, "date": day.isoformat(),
                                "path": str(path.relative_to(data_root)), "sha256": sha256_file(path)})
    return out
