"""Feast declarations for the fraud example: entities, file sources, feature views, feature services.

Declarations only: no data access, no side effects. Source paths come from the environment so the
same repo serves the demo and a test's temporary data root:

- ``CTRAIN_DATA_ROOT``: where ``python -m ctrain_examples.fraud`` wrote the data (default ``$CTRAIN_HOME/data``)
- ``CTRAIN_HOME``: ctrain's state directory (default ``<checkout>/.ctrain``)

Paths are resolved when the repo is applied and stored in the registry, so re-apply after changing them
(``ctrain.featurestore.apply_feature_repo`` does this with the current settings).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

_HOME = Path(os.environ.get("CTRAIN_HOME") or Path(__file__).resolve().parents[1] / ".ctrain")
DATA_ROOT = Path(os.environ.get("CTRAIN_DATA_ROOT") or _HOME / "data")

# ---------------------------------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------------------------------

customer = Entity(
    name="customer", join_keys=["customer_id"], value_type=ValueType.INT64, description="A card holder."
)
merchant = Entity(
    name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64, description="A card acceptor."
)

# ---------------------------------------------------------------------------------------------------
# Sources: one parquet file per day (date=YYYY-MM-DD/part-0.parquet); each row is an aggregate computed
# over everything before its event_timestamp (00:00 UTC of that day).
# ---------------------------------------------------------------------------------------------------

customer_stats_source = FileSource(
    name="customer_stats_source",
    path=str(DATA_ROOT / "features" / "customer_stats" / "date=*" / "*.parquet"),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily customer aggregates written by the (simulated) aggregation job.",
)

merchant_stats_source = FileSource(
    name="merchant_stats_source",
    path=str(DATA_ROOT / "features" / "merchant_stats" / "date=*" / "*.parquet"),
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Daily merchant aggregates written by the (simulated) aggregation job.",
)

# ---------------------------------------------------------------------------------------------------
# Feature views. TTL 2 days: rows are refreshed daily, so one late partition is tolerated (the previous
# day's value is served); older values are treated as missing.
# ---------------------------------------------------------------------------------------------------

customer_stats = FeatureView(
    name="customer_stats",
    entities=[customer],
    ttl=timedelta(days=2),
    schema=[
        Field(name="customer_id", dtype=Int64),
        Field(name="customer_avg_amount_30d", dtype=Float64, description="Mean amount, last 30 days."),
        Field(name="customer_txn_count_7d", dtype=Float64, description="Transactions, last 7 days."),
        Field(name="customer_chargeback_rate_90d", dtype=Float64, description="Chargebacks / txns, 90 d."),
        Field(name="customer_account_age_days", dtype=Float64, description="Days since account opened."),
    ],
    source=customer_stats_source,
    online=True,
    tags={"owner": "ctrain", "domain": "fraud"},
)

merchant_stats = FeatureView(
    name="merchant_stats",
    entities=[merchant],
    ttl=timedelta(days=2),
    schema=[
        Field(name="merchant_id", dtype=Int64),
        Field(name="merchant_fraud_rate_30d", dtype=Float64, description="Confirmed fraud rate, 30 days."),
        Field(name="merchant_avg_amount_30d", dtype=Float64, description="Mean amount, last 30 days."),
        Field(name="merchant_txn_count_7d", dtype=Float64, description="Transactions, last 7 days."),
    ],
    source=merchant_stats_source,
    online=True,
    tags={"owner": "ctrain", "domain": "fraud"},
)

# ---------------------------------------------------------------------------------------------------
# Feature services: one per model version. Never edit a published service; add fraud_model_v2.
# ---------------------------------------------------------------------------------------------------

fraud_model_v1 = FeatureService(
    name="fraud_model_v1",
    features=[customer_stats, merchant_stats],
    description="Features of fraud_detector v1 (plus the transaction amount from the event itself).",
    tags={"model": "fraud_detector", "version": "1"},
)
