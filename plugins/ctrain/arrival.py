"""Which landed partitions of a pipeline's events table have not been announced to its training DAG yet.

The events table is the definition's ``events.table``, landed as ``{data_root}/{table}/date=YYYY-MM-DD/``
with parquet files inside; the high-water mark is per pipeline, at
``{object_root}/state/{pipeline}/{table}_announced.json``.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from ctrain import layout, storage
from ctrain.landing import list_partitions

if TYPE_CHECKING:
    from ctrain.settings import Settings


def _marker(settings: Settings) -> str:
    return layout.announced_marker_uri(settings.resolved_object_root, settings.pipeline,
                                       settings.definition.events.table)


def last_announced(settings: Settings) -> date | None:
    marker = storage.read_json(_marker(settings), settings)
    return None if marker is None else date.fromisoformat(marker["newest"])


def landed_partitions(settings: Settings) -> list[date]:
    """Dates with a partition of the events table, sorted (the layout is :func:`ctrain.landing.list_partitions`'s)."""
    return list_partitions(settings.resolved_data_root, settings.definition.events.table)


def unannounced_partitions(settings: Settings) -> list[date]:
    """Landed partition dates newer than the high-water mark, oldest first."""
    newest = last_announced(settings)
    return [d for d in landed_partitions(settings) if newest is None or d > newest]


def mark_announced(settings: Settings, days: list[str]) -> None:
    """Advance the high-water mark to the newest of ``days`` (written whole, never half)."""
    storage.put_json(_marker(settings), {"newest": max(days)}, settings)
