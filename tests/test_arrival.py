"""Data-arrival bookkeeping: each landed day is announced exactly once."""

from __future__ import annotations

from datetime import date

from ctrain import datagen
from ctrain.arrival import last_announced, mark_announced, unannounced_partitions
from ctrain.settings import Settings


def test_new_partitions_are_announced_once(tmp_path):
    settings = Settings(home=tmp_path)
    datagen.generate(settings.resolved_data_root, days=2, start="2026-03-01", rows_per_day=50,
                     n_customers=20, n_merchants=5)
    assert unannounced_partitions(settings) == [date(2026, 3, 1), date(2026, 3, 2)]
    mark_announced(settings, ["2026-03-01", "2026-03-02"])
    assert last_announced(settings) == date(2026, 3, 2)
    assert unannounced_partitions(settings) == []

    datagen.append_day(settings.resolved_data_root, "2026-03-03")
    assert unannounced_partitions(settings) == [date(2026, 3, 3)]
