"""Where everything lives: the object-store layout under ``{object_root}`` and the landed data under
``{data_root}``. Every other module asks here instead of formatting a path itself (docs/contracts.md)::

    {object_root}/datasets/{dataset_version}/{train,val,test}.parquet, manifest.json   dataset snapshots
    {object_root}/checkpoints/{run_key}/step-{N:08d}/                                  trainer checkpoints
    {object_root}/runs/{run_key}/result.json, failure.json                             trainer output
    {object_root}/runs/{run_key}/evaluation/predictions-vs-{champion}.parquet         per-row test outputs
    {object_root}/reports/validations/{dataset_version}/{result_id}/                   GX reports
    {object_root}/audit/{model}/{seq:08d}.json                                          audit chain records
    {object_root}/locks/{model}.lock (file:// only; else {home}/locks/)                promotion file lock
    {object_root}/state/{pipeline}/{table}_announced.json                              arrival high-water mark
    {data_root}/{table}/date=YYYY-MM-DD/*.parquet                                       landed partitions

Functions take the root (a URI string or a local path), so they serve the settings' roots and a caller's
own (a test's, a report root passed to the validation gate) alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ctrain.storage import join

if TYPE_CHECKING:
    from datetime import date

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
PARTITION_PREFIX = "date="


# ---- object store ---------------------------------------------------------------------------------
def datasets_root(object_root: str) -> str:
    return join(object_root, "datasets")


def dataset_uri(object_root: str, dataset_version: str) -> str:
    """The snapshot directory of ``dataset_version``."""
    return join(datasets_root(object_root), dataset_version)


def split_file(split: str) -> str:
    """File name of one split inside a snapshot directory."""
    return f"{split}.parquet"


def manifest_uri(snapshot_uri: str) -> str:
    """The snapshot's commit marker (written last)."""
    return join(snapshot_uri, MANIFEST)


def checkpoint_uri(object_root: str, run_key: str) -> str:
    """The trainer's checkpoint directory for one run key (``step-*/`` inside is the trainer's)."""
    return join(object_root, "checkpoints", run_key)


def run_output_uri(object_root: str, run_key: str) -> str:
    """The trainer's ``output.uri`` for one run key (result.json, failure.json)."""
    return join(object_root, "runs", run_key)


def predictions_uri(object_root: str, run_key: str, champion_version: str | None) -> str:
    """Per-row test outputs of one run's model and of the champion it was compared with (``v3`` or ``none``)."""
    against = f"v{champion_version}" if champion_version is not None else "none"
    return join(run_output_uri(object_root, run_key), "evaluation", f"predictions-vs-{against}.parquet")


def reports_root(object_root: str) -> str:
    return join(object_root, "reports")


def validation_report_uri(report_root: str, dataset_version: str, result_id: str) -> str:
    """Directory of one GX report (``result.json`` + ``data_docs/``)."""
    return join(report_root, "validations", dataset_version, result_id)


def audit_dir(object_root: str, model: str) -> str:
    """The hash-chained audit log of one registered model (:mod:`ctrain.audit`)."""
    return join(object_root, "audit", model)


AUDIT_SUFFIX = ".json"


def audit_record_uri(object_root: str, model: str, seq: int) -> str:
    """Record ``seq`` (0, 1, ...) of a model's audit chain; the zero padding keeps names in chain order."""
    return join(audit_dir(object_root, model), f"{seq:08d}{AUDIT_SUFFIX}")


def audit_seq(name: str) -> int | None:
    """The sequence number of an audit chain file name, None for anything else in the directory."""
    stem = name.removesuffix(AUDIT_SUFFIX)
    return int(stem) if name.endswith(AUDIT_SUFFIX) and stem.isdigit() else None


def lock_file(directory: Path | str, model: str) -> Path:
    """The promotion file lock of one model under a local ``directory`` (object root or home)."""
    return Path(directory) / "locks" / f"{model}.lock"


def announced_marker_uri(object_root: str, pipeline: str, table: str) -> str:
    """The arrival sensor's high-water mark for one pipeline's events table."""
    return join(object_root, "state", pipeline, f"{table}_announced.json")


# ---- landed data ----------------------------------------------------------------------------------
def table_dir(data_root: Path | str, table: str) -> Path:
    return Path(data_root) / table


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day.isoformat()}"


def partition_dir(data_root: Path | str, table: str, day: date) -> Path:
    """Directory of one daily partition of a landed table: ``{data_root}/{table}/date=YYYY-MM-DD``."""
    return table_dir(data_root, table) / partition_name(day)


def partition_glob(data_root: Path | str, table: str) -> str:
    """Glob of every parquet file of a landed table (a Feast FileSource path)."""
    return str(table_dir(data_root, table) / f"{PARTITION_PREFIX}*" / "*.parquet")
