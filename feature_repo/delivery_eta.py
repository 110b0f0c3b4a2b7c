"""Feast declarations for the delivery-ETA example: entities, file sources, feature views, feature service.

Declarations only, like ``definitions.py`` (the fraud example) beside it; both share one Feast project, so
no name here repeats one of its. Source paths come from the environment (see ``definitions.py``): the
data is what ``python -m ctrain_examples.delivery_eta`` writes under ``CTRAIN_DATA_ROOT``.
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

_HOME = Path(os.environ.get("CTRAIN_HOME") or Path(__file__).resolve().parents[1] / ".ctrain")
DATA_ROOT = Path(os.environ.get("CTRAIN_DATA_ROOT") or _HOME / "data")

courier = Entity(
    name="courier", join_keys=["courier_id"], value_type=ValueType.INT64, description="A delivery courier."
)
zone = Entity(
    name="zone", join_keys=["zone_id"], value_type=ValueType.INT64, description="A delivery zone of the city."
)

# One parquet file per day (date=YYYY-MM-DD/part-0.parquet); each row is an aggregate over the days before
# its event_timestamp (00:00 UTC of that day).
courier_stats_source = FileSource(
    name="courier_stats_source",
    path=str(DATA_ROOT / "features" / "courier_stats" / "date=*" / "*.parquet"),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily courier aggregates written by the (simulated) dispatch analytics job.",
)

zone_stats_source = FileSource(
    name="zone_stats_source",
    path=str(DATA_ROOT / "features" / "zone_stats" / "date=*" / "*.parquet"),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily zone aggregates written by the (simulated) dispatch analytics job.",
)

# TTL 2 days: rows are refreshed daily, so one late partition is tolerated (the previous day's value is
# served); older values are treated as missing.
courier_stats = FeatureView(
    name="courier_stats",
    entities=[courier],
    ttl=timedelta(days=2),
    schema=[
        Field(name="courier_id", dtype=Int64),
        Field(name="courier_avg_minutes_14d", dtype=Float64, description="Mean delivery minutes, 14 days."),
        Field(name="courier_deliveries_7d", dtype=Float64, description="Deliveries, last 7 days."),
        Field(name="courier_tenure_days", dtype=Float64, description="Days since the courier started."),
    ],
    source=courier_stats_source,
    online=True,
    tags={"owner": "ctrain", "domain": "delivery_eta"},
)

zone_stats = FeatureView(
    name="zone_stats",
    entities=[zone],
    ttl=timedelta(days=2),
    schema=[
        Field(name="zone_id", dtype=Int64),
        Field(name="zone_congestion_index", dtype=Float64, description="Measured congestion, previous day, 0-1."),
        Field(name="zone_avg_minutes_7d", dtype=Float64, description="Mean delivery minutes, 7 days."),
    ],
    source=zone_stats_source,
    online=True,
    tags={"owner": "ctrain", "domain": "delivery_eta"},
)

# One service per model version. Never edit a published service; add delivery_eta_v2.
delivery_eta_v1 = FeatureService(
    name="delivery_eta_v1",
    features=[courier_stats, zone_stats],
    description="Features of delivery_eta v1 (plus the delivery's distance_km from the event itself).",
    tags={"model": "delivery_eta", "version": "1"},
)
