"""Data-arrival bookkeeping: each landed day is announced exactly once."""

from __future__ import annotations

from datetime import date

from ctrain.arrival import last_announced, mark_announced, unannounced_partitions
from ctrain.settings import Settings
from ctrain_examples import fraud as fraud_example


def test_new_partitions_are_announced_once(tmp_path):
    settings = Settings(home=tmp_path)
    fraud_example.generate(settings.resolved_data_root, days=2, start="2026-03-01", rows_per_day=50,
                     n_customers=20, n_merchants=5)
    assert unannounced_partitions(settings) == [date(2026, 3, 1), date(2026, 3, 2)]
    mark_announced(settings, ["2026-03-01", "2026-03-02"])
    assert last_announced(settings) == date(2026, 3, 2)
    assert unannounced_partitions(settings) == []

    fraud_example.append_day(settings.resolved_data_root, "2026-03-03")
    assert unannounced_partitions(settings) == [date(2026, 3, 3)]


def test_each_pipeline_watches_its_own_events_table(tmp_path):
    from ctrain_examples import delivery_eta

    fraud, delivery = Settings(home=tmp_path), Settings(home=tmp_path, pipeline="delivery_eta")
    delivery_eta.generate(delivery.resolved_data_root, days=2, start="2026-03-01", rows_per_day=50,
                          n_couriers=10, n_zones=3)
    assert unannounced_partitions(fraud) == []
    assert unannounced_partitions(delivery) == [date(2026, 3, 1), date(2026, 3, 2)]
    mark_announced(delivery, ["2026-03-02"])
    assert last_announced(delivery) == date(2026, 3, 2) and last_announced(fraud) is None
