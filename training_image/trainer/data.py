"""Dataset snapshot -> in-memory tensors, and the resumable, deterministic distributed batch sampler.

A snapshot is ``{dataset_uri}/{train,val,test}.parquet`` plus ``manifest.json`` (docs/contracts.md);
the manifest is the commit marker, so a snapshot without one is refused. Each split file is read once,
its sha256 checked against the manifest, and kept as tensors (tabular data fits in memory).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from trainer.errors import DataError
from trainer.storage import filesystem, join

if TYPE_CHECKING:
    from collections.abc import Iterator

SPLITS = ("train", "val", "test")
_REQUIRED_MANIFEST_KEYS = ("dataset_version", "feature_columns", "label_column", "id_column", "splits")


@dataclass(frozen=True)
class Split:
    """One split as tensors: sample ids, raw features ``(n, f)`` float32, labels."""

    ids: Tensor
    features: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass(frozen=True)
class Snapshot:
    """A loaded, verified dataset snapshot."""

    uri: str
    manifest: dict[str, Any]
    train: Split
    val: Split
    test: Split

    @property
    def dataset_version(self) -> str:
        return str(self.manifest["dataset_version"])

    @property
    def feature_columns(self) -> list[str]:
        return list(self.manifest["feature_columns"])


def load_snapshot(uri: str, task_type: str, verify_checksums: bool = True) -> Snapshot:
    """Read and verify the snapshot at ``uri``; raise DataError naming the file and the rule broken."""
    fs, root = filesystem(uri)
    manifest_path = f"{root}/manifest.json"
    if not fs.exists(manifest_path):
        raise DataError(
            f"dataset snapshot {uri}: no manifest.json (the snapshot was never committed or the URI is wrong)"
        )
    try:
        manifest = json.loads(fs.cat_file(manifest_path))
    except ValueError as exc:
        raise DataError(f"dataset snapshot {uri}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(
            f"dataset snapshot {uri}: manifest.json holds a JSON {type(manifest).__name__}, not an object; "
            "rebuild the snapshot"
        )
    missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"dataset snapshot {uri}: manifest.json lacks {', '.join(missing)}")
    problems = _manifest_shape_problems(manifest)
    if problems:
        raise DataError(f"dataset snapshot {uri}: manifest.json is malformed ({'; '.join(problems)}); "
                        "rebuild the snapshot")
    splits = {
        name: _load_split(fs, root, uri, manifest, name, task_type, verify_checksums) for name in SPLITS
    }
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise DataError(f"dataset snapshot {uri}: train and val splits must not be empty")
    return Snapshot(uri=uri, manifest=manifest, **splits)


def _manifest_shape_problems(manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the manifest's types; split files must be plain names inside the snapshot."""
    problems = []
    columns = manifest["feature_columns"]
    if not (isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns)):
        problems.append("feature_columns must be a non-empty list of column names")
    for key in ("label_column", "id_column", "dataset_version"):
        if not isinstance(manifest[key], str):
            problems.append(f"{key} must be a string")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        return [*problems, "splits must be an object"]
    for name, entry in splits.items():
        if not isinstance(entry, dict):
            problems.append(f"splits.{name} must be an object")
            continue
        file = entry.get("file", f"{name}.parquet")
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file.startswith("."):
            problems.append(f"splits.{name}.file must be a file name inside the snapshot, got {file!r}")
    return problems


def _load_split(
    fs: Any, root: str, uri: str, manifest: dict[str, Any], name: str, task_type: str, verify: bool
) -> Split:
    entry = manifest["splits"].get(name)
    if entry is None:
        raise DataError(f"dataset snapshot {uri}: manifest.json has no '{name}' split")
    file_uri = join(uri, entry.get("file", f"{name}.parquet"))
    path = f"{root}/{entry.get('file', f'{name}.parquet')}"
    try:
        blob = fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"dataset snapshot {uri}: {file_uri} listed in the manifest does not exist") from None
    if verify and hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
        raise DataError(
            f"dataset snapshot {uri}: {file_uri} does not match the sha256 in manifest.json "
            "(the file changed after the snapshot was committed; rebuild the snapshot)"
        )
    table = pq.read_table(io.BytesIO(blob))
    features, label, id_col = manifest["feature_columns"], manifest["label_column"], manifest["id_column"]
    absent = [c for c in [id_col, label, *features] if c not in table.column_names]
    if absent:
        raise DataError(f"dataset snapshot {uri}: {file_uri} lacks column(s) {', '.join(absent)}")
    if "rows" in entry and table.num_rows != entry["rows"]:
        raise DataError(
            f"dataset snapshot {uri}: {file_uri} has {table.num_rows} rows, manifest says {entry['rows']}"
        )
    x = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in features])
    if x.size and not np.isfinite(x).all():
        bad = [c for i, c in enumerate(features) if not np.isfinite(x[:, i]).all()]
        raise DataError(
            f"dataset snapshot {uri}: {file_uri} has NaN/inf in feature column(s) {', '.join(bad)}"
        )
    y = table.column(label).to_numpy(zero_copy_only=False)
    _check_labels(y, task_type, f"dataset snapshot {uri}: {file_uri} column {label!r}")
    ids = table.column(id_col).to_numpy(zero_copy_only=False).astype(np.int64)
    labels = torch.from_numpy(y.astype(np.int64 if task_type == "multiclass" else np.float32))
    return Split(ids=torch.from_numpy(ids), features=torch.from_numpy(np.ascontiguousarray(x)), labels=labels)


def _check_labels(y: np.ndarray, task_type: str, where: str) -> None:
    if y.size == 0:
        return
    if not np.isfinite(y.astype(np.float64)).all():
        raise DataError(f"{where}: labels contain NaN/inf")
    if task_type == "binary" and not np.isin(y, (0, 1)).all():
        raise DataError(
            f"{where}: binary labels must be 0 or 1, found {sorted(set(np.unique(y)) - {0, 1})[:5]}"
        )
    if task_type == "multiclass" and (y.min() < 0 or not np.equal(np.mod(y, 1), 0).all()):
        raise DataError(f"{where}: multiclass labels must be non-negative integers")


def feature_stats(split: Split) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of the train split (float64 accumulation for stability)."""
    x = split.features.double()
    return x.mean(dim=0).float(), x.std(dim=0, unbiased=False).float()


@dataclass(frozen=True)
class Step:
    """One optimizer step for this rank: its index lists per micro-batch, and the global batch size."""

    micro_batches: list[Tensor]
    global_size: int


class ResumableSampler:
    """Deterministic per-epoch order shared by all ranks, cut into global batches.

    Epoch ``e`` uses ``randperm(n)`` seeded by ``(seed, e)``, independent of rank and world size, so the
    same samples make up each optimizer step whatever the world size. A global batch is split into
    ``accum`` micro-batches and rank ``r`` takes every ``world_size``-th sample of each. The last batch
    may be short and is not dropped: each epoch is exactly one pass. Resuming at ``start_step`` skips
    the batches already consumed in that epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, accum: int, world_size: int, rank: int, seed: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.accum = accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The epoch's sample order (positions into the split)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def steps(self, epoch: int, start_step: int = 0) -> Iterator[Step]:
        """Steps ``start_step ..`` of ``epoch`` for this rank."""
        order = self.order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            chunks = batch.tensor_split(self.accum) if self.accum > 1 else (batch,)
            micro = [c[self.rank :: self.world_size] for c in chunks] if self.world_size > 1 else list(chunks)
            yield Step(micro_batches=micro, global_size=len(batch))


def shard(num_samples: int, world_size: int, rank: int, batch_size: int) -> list[Tensor]:
    """Evaluation shard of this rank as index batches (every sample evaluated by exactly one rank)."""
    return list(torch.arange(rank, num_samples, world_size).split(batch_size))
