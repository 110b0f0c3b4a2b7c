"""Snapshot loading and the resumable distributed sampler."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import torch
from trainer_testkit import FEATURES, TrainerRun, write_snapshot

from trainer.data import ResumableSampler, load_snapshot, shard
from trainer.errors import DataError

if TYPE_CHECKING:
    from pathlib import Path


def test_snapshot_loads_as_tensors_in_manifest_order(tmp_path: Path) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10))
    snap = load_snapshot(uri, "binary")
    assert snap.feature_columns == FEATURES
    assert snap.train.features.shape == (50, len(FEATURES)) and snap.train.features.dtype == torch.float32
    assert snap.val.ids.tolist() == list(range(50, 70))
    assert set(snap.test.labels.unique().tolist()) <= {0.0, 1.0}


def test_modified_split_file_fails_its_checksum(tmp_path: Path) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10))
    with (tmp_path / "snap" / "val.parquet").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataError, match=r"val.parquet does not match the sha256 in manifest.json"):
        load_snapshot(uri, "binary")


def test_uncommitted_snapshot_is_refused(tmp_path: Path) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10))
    (tmp_path / "snap" / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        load_snapshot(uri, "binary")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: [], "holds a JSON list, not an object"),
        (lambda m: None, "holds a JSON NoneType, not an object"),
        (lambda m: {**m, "splits": []}, "splits must be an object"),
        (lambda m: {**m, "feature_columns": "amount"}, "feature_columns must be a non-empty list"),
        (lambda m: {**m, "label_column": 3}, "label_column must be a string"),
        (lambda m: {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "file": "../outside.parquet"}}},
         "splits.train.file must be a file name inside the snapshot"),
    ],
)
def test_a_malformed_manifest_is_a_data_error_naming_the_rule(tmp_path: Path, damage, message: str) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10))
    manifest_path = tmp_path / "snap" / "manifest.json"
    (tmp_path / "outside.parquet").write_bytes((tmp_path / "snap" / "train.parquet").read_bytes())
    manifest_path.write_text(json.dumps(damage(json.loads(manifest_path.read_text()))))
    with pytest.raises(DataError, match=message):
        load_snapshot(uri, "binary")


def test_missing_feature_column_is_named(tmp_path: Path) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10))
    manifest_path = tmp_path / "snap" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["feature_columns"].append("velocity_24h")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lacks column.s. velocity_24h"):
        load_snapshot(uri, "binary")


def test_cli_exits_65_on_bad_data_and_records_it(tmp_path: Path) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10))
    (tmp_path / "snap" / "train.parquet").write_bytes(b"not parquet")
    run = TrainerRun(tmp_path / "run", uri)
    proc = run(nproc=1)
    assert proc.returncode == 65
    assert "train.parquet does not match the sha256 in manifest.json" in proc.stderr
    result = run.result()
    assert result["status"] == "failed" and result["exit_code"] == 65 and result["retryable"] is False


def test_non_binary_labels_are_refused_for_a_binary_task(tmp_path: Path) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10), task="multiclass")
    with pytest.raises(DataError, match="binary labels must be 0 or 1"):
        load_snapshot(uri, "binary")


@pytest.mark.parametrize(("world_size", "accum"), [(1, 1), (2, 1), (2, 2), (3, 4)])
def test_each_epoch_is_exactly_one_pass_across_a_resume(world_size: int, accum: int) -> None:
    n, batch = 103, 16  # a short last batch, and one smaller than world_size * accum chunks
    samplers = [ResumableSampler(n, batch, accum, world_size, rank, seed=7) for rank in range(world_size)]
    assert samplers[0].steps_per_epoch == 7
    for epoch in range(2):
        seen: list[int] = []
        for sampler in samplers:
            # Consume 3 steps, "crash", resume at step 3 with a fresh sampler.
            first = [idx for step in list(sampler.steps(epoch))[:3] for idx in step.micro_batches]
            fresh = ResumableSampler(n, batch, accum, world_size, sampler.rank, seed=7)
            rest = [idx for step in fresh.steps(epoch, start_step=3) for idx in step.micro_batches]
            seen += torch.cat(first + rest).tolist()
        assert sorted(seen) == list(range(n))


def test_step_composition_does_not_depend_on_world_size() -> None:
    one = [torch.cat(s.micro_batches) for s in ResumableSampler(40, 8, 1, 1, 0, seed=1).steps(0)]
    two = [
        torch.cat([*a.micro_batches, *b.micro_batches])
        for a, b in zip(
            ResumableSampler(40, 8, 1, 2, 0, seed=1).steps(0),
            ResumableSampler(40, 8, 1, 2, 1, seed=1).steps(0),
            strict=True,
        )
    ]
    assert [sorted(x.tolist()) for x in one] == [sorted(x.tolist()) for x in two]


def test_epochs_are_shuffled_differently_and_reproducibly() -> None:
    sampler = ResumableSampler(100, 10, 1, 1, 0, seed=3)
    assert not torch.equal(sampler.order(0), sampler.order(1))
    assert torch.equal(sampler.order(1), ResumableSampler(100, 10, 1, 1, 0, seed=3).order(1))


def test_eval_shards_cover_the_split_once() -> None:
    covered = torch.cat([idx for rank in range(3) for idx in shard(10, 3, rank, batch_size=2)])
    assert sorted(covered.tolist()) == list(range(10))


def test_a_config_refused_at_load_leaves_its_terminal_code_in_failure_json(tmp_path: Path) -> None:
    # torchrun exits 1 for any failed worker; without failure.json the launcher would take a bad config
    # for a retryable failure and retry it.
    uri = write_snapshot(tmp_path / "snap", rows=(50, 20, 10))
    run = TrainerRun(tmp_path / "run", uri)
    proc = run("optimizer.lr=-1", nproc=2)
    assert proc.returncode != 0
    record = json.loads((tmp_path / "run" / "output" / "failure.json").read_text())
    assert record["exit_code"] == 65 and record["retryable"] is False
    assert "optimizer.lr" in record["error"]


def test_a_result_json_that_is_not_an_object_is_ignored_and_replaced(tmp_path: Path) -> None:
    uri = write_snapshot(tmp_path / "snap", rows=(64, 32, 32))
    run = TrainerRun(tmp_path / "run", uri)
    (tmp_path / "run" / "output").mkdir(parents=True)
    (tmp_path / "run" / "output" / "result.json").write_text("[]")
    proc = run("train.epochs=1", nproc=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "result.json is not a JSON object; ignoring it" in proc.stderr
    assert run.result()["status"] == "succeeded"
