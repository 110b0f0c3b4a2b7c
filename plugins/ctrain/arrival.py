"""Which landed partitions of a pipeline's events table have not been announced to its training DAG yet.

The events table is the definition's ``events.table``, landed as ``{data_root}/{table}/date=YYYY-MM-DD/``
with parquet files inside; the high-water mark is per pipeline, at
``{object_root}/state/{pipeline}/{table}_announced.json``.
"""

from __future__ import annotations

import json
from datetime import date
from typing import TYPE_CHECKING

from ctrain.features import list_partitions, open_fs, write_bytes

if TYPE_CHECKING:
    from ctrain.settings import Settings


def _marker(settings: Settings) -> str:
    table = settings.definition.events.table
    return f"{settings.resolved_object_root}/state/{settings.pipeline}/{table}_announced.json"


def last_announced(settings: Settings) -> date | None:
    fs, path = open_fs(_marker(settings), settings)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return date.fromisoformat(json.load(fh)["newest"])


def landed_partitions(settings: Settings) -> list[date]:
    """Dates with a partition of the events table, sorted (the layout is :func:`ctrain.features.list_partitions`'s)."""
    return list_partitions(settings.resolved_data_root, settings.definition.events.table)


def unannounced_partitions(settings: Settings) -> list[date]:
    """Landed partition dates newer than the high-water mark, oldest first."""
    newest = last_announced(settings)
    return [d for d in landed_partitions(settings) if newest is None or d > newest]


def mark_announced(settings: Settings, days: list[str]) -> None:
    """Advance the high-water mark to the newest of ``days`` (written whole, never half)."""
    fs, path = open_fs(_marker(settings), settings)
    write_bytes(fs, path, json.dumps({"newest": max(days)}).encode())
