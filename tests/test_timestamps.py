"""Feature tables landed with nanosecond timestamps are refused at the door (``ctrain.timestamps``): they
would pass the point-in-time join and then break the online-store load after promotion."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrain import featurestore, landing, layout
from ctrain import snapshot as snapshots
from ctrain.errors import DataError


def _recast(settings, table: str, unit: str) -> Path:
    """Rewrite the first partition of ``table`` with its timestamp columns in ``unit``; return its file."""
    day = landing.list_partitions(Path(settings.resolved_data_root), table)[0]
    (path,) = layout.partition_dir(Path(settings.resolved_data_root), table, day).glob("*.parquet")
    data = pq.read_table(path)
    schema = pa.schema([pa.field(f.name, pa.timestamp(unit, tz="UTC")) if pa.types.is_timestamp(f.type) else f
                        for f in data.schema])
    pq.write_table(data.cast(schema), path)
    return path


def test_a_nanosecond_feature_partition_is_refused_naming_the_column_and_the_fix(dp_generated):
    path = _recast(dp_generated, "features/customer_stats", "ns")
    expected = rf"{path}: column 'event_timestamp' is timestamp\[ns, tz=UTC\]; feature tables carry timestamp\[us"
    with pytest.raises(DataError, match=expected) as refused:
        snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    assert "pa.timestamp('us', tz='UTC')" in str(refused.value)
    assert not (Path(dp_generated.resolved_object_root.removeprefix("file://")) / "datasets").exists()
    with pytest.raises(DataError, match=expected):
        featurestore.materialize_incremental(dp_generated, datetime(2026, 1, 6, 12, tzinfo=UTC))


def test_the_partition_loads_online_once_landed_in_microseconds(dp_generated):
    _recast(dp_generated, "features/customer_stats", "ns")
    _recast(dp_generated, "features/customer_stats", "us")  # the fix the refusal names
    snapshots.build_snapshot(dp_generated, val_days=1, test_days=1)
    featurestore.materialize_incremental(dp_generated, datetime(2026, 1, 6, 12, tzinfo=UTC))
    online = featurestore.get_online_features(dp_generated, [{"customer_id": 5, "merchant_id": 3}])
    assert all(v is not None for values in online.values() for v in values)
