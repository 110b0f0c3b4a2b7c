"""Every Asset the ctrain DAGs produce or consume, declared once."""

from __future__ import annotations

from airflow.sdk import Asset

# A new daily partition of labelled card transactions has landed (producer: ingest_transactions;
# consumer: continuous_training). Also emitted by the drift monitor to request a retrain.
TRANSACTIONS = Asset(name="transactions", uri="file:///ctrain/transactions", group="ctrain")
