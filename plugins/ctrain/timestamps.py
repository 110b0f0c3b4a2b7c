"""The one timestamp type of landed tables: ``timestamp[us, tz=UTC]`` (microseconds, UTC).

Feast reads the feature tables straight from the landed parquet files; its duckdb offline store joins
nanosecond timestamps for training but cannot cast them when it loads the online store
(``TIMESTAMPTZ_NS -> TIMESTAMP``), so a partition with another unit would pass the snapshot and break
``materialize_online`` after promotion. ctrain does not rewrite landed data, so such a partition is
refused before the snapshot is built and before the online store is loaded. (The events table is read
by ctrain itself and cast to the same type, see ``ctrain.landing.load_events``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctrain.errors import DataError

if TYPE_CHECKING:
    from pathlib import Path

UNIT = "us"
TYPE = "timestamp[us, tz=UTC]"


def check_feature_file(path: Path) -> None:
    """Raise DataError naming the column if a timestamp column of the parquet file at ``path`` is not
    ``timestamp[us, tz=UTC]`` (reads the footer only)."""
    import pyarrow.parquet as pq
    import pyarrow.types as pat

    for field in pq.read_schema(path):
        if pat.is_timestamp(field.type) and (field.type.unit != UNIT or field.type.tz is None):
            raise DataError(
                f"{path}: column {field.name!r} is {field.type}; feature tables carry {TYPE} (Feast's online "
                f"store cannot load other units). Write it as pa.timestamp('us', tz='UTC') (pandas: "
                f"df[{field.name!r}].astype('datetime64[us, UTC]')) and land the partition again"
            )


def check_feature_tables(data_root: Path, tables: list[str]) -> None:
    """:func:`check_feature_file` on every landed partition file of ``tables`` under ``data_root``."""
    from ctrain.landing import list_partitions
    from ctrain.layout import partition_dir

    for table in tables:
        for day in list_partitions(data_root, table):
            for path in sorted(partition_dir(data_root, table, day).glob("*.parquet")):
                check_feature_file(path)
