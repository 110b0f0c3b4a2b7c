"""Which landed transaction partitions have not been announced to the training DAG yet."""

from __future__ import annotations

import json
from datetime import date
from typing import TYPE_CHECKING

from ctrain.datagen import TRANSACTIONS, list_partitions
from ctrain.features import open_fs, write_bytes

if TYPE_CHECKING:
    from ctrain.settings import Settings


def _marker(settings: Settings) -> str:
    return f"{settings.resolved_object_root}/state/transactions_announced.json"


def last_announced(settings: Settings) -> date | None:
    fs, path = open_fs(_marker(settings), settings)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return date.fromisoformat(json.load(fh)["newest"])


def unannounced_partitions(settings: Settings) -> list[date]:
    """Landed partition dates newer than the high-water mark, oldest first."""
    newest = last_announced(settings)
    days = list_partitions(settings.resolved_data_root, TRANSACTIONS)
    return [d for d in days if newest is None or d > newest]


def mark_announced(settings: Settings, days: list[str]) -> None:
    """Advance the high-water mark to the newest of ``days`` (written whole, never half)."""
    fs, path = open_fs(_marker(settings), settings)
    write_bytes(fs, path, json.dumps({"newest": max(days)}).encode())
