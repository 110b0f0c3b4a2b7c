"""CheckpointManager in one process: commit protocol, verification, fallback, retention, safe loading, S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from torch import nn

from trainer.checkpoint import CheckpointManager
from trainer.distributed import DistContext
from trainer.errors import CheckpointError, RetryableError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

CTX = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class JsonState:
    """A registered JSON-able state (what the loop's counters are to the manager)."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.value

    def load_state_dict(self, value: dict[str, Any]) -> None:
        self.value = value


def manager(
    uri: str, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, **overrides: Any
) -> CheckpointManager:
    """A manager with ``model`` and ``optimizer`` (a fresh trained pair if not given) and a ``loop``
    state registered."""
    if model is None or optimizer is None:
        model, optimizer = trained_pair(seed=7)
    options: dict[str, Any] = {
        "config_hash": "cfg",
        "dataset_version": "data",
        "keep_last": 2,
        "keep_best": True,
        "async_save": True,
        "allow_mismatch": False,
        "states": {"loop": JsonState()},
    }
    return CheckpointManager(uri, CTX, model=model, optimizer=optimizer, **{**options, **overrides})


def save(mgr: CheckpointManager, step: int, best: int | None = None) -> None:
    """Save ``step`` with the loop state ``{"global_step": step}``."""
    mgr.states["loop"].load_state_dict({"global_step": step})
    mgr.save(step, best_step=best)


def trained_pair(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(16, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save_steps(mgr: CheckpointManager, steps: list[int], best: int | None = None) -> tuple[nn.Module, Any]:
    for step in steps:
        save(mgr, step, best)
    mgr.wait()
    return mgr.model, mgr.optimizer


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path: Path) -> None:
    model, optimizer = trained_pair()
    mgr = manager(f"file://{tmp_path}", model, optimizer)
    torch.manual_seed(123)
    random.seed(123)
    random.gauss(0, 1)  # leaves a cached second normal in python's state
    np.random.seed(123)
    np.random.standard_normal()  # and in numpy's
    rng_before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    save(mgr, 7, best=7)
    mgr.close()
    fresh_model, fresh_opt = trained_pair(seed=1)
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    loaded = manager(f"file://{tmp_path}", fresh_model, fresh_opt)
    assert loaded.load() == 7  # resume: latest, restore, prepare the directory
    assert loaded.states["loop"].value == {"global_step": 7}
    assert loaded.restore(7)["loop"] == {"global_step": 7}
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        optimizer.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(torch.get_rng_state(), rng_before[0])
    assert random.getstate() == rng_before[1]
    numpy_state, numpy_before = np.random.get_state(), rng_before[2]
    assert numpy_state[0] == numpy_before[0] and np.array_equal(numpy_state[1], numpy_before[1])
    assert numpy_state[2:] == numpy_before[2:]
    manifest = json.loads((tmp_path / "step-00000007" / "manifest.json").read_text())
    assert (
        manifest["config_hash"] == "cfg"
        and manifest["dataset_version"] == "data"
        and manifest["world_size"] == 1
    )


@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_lists_every_file_with_the_sha256_and_size_of_its_bytes(
    tmp_path: Path, async_save: bool
) -> None:
    # The digests are taken from the bytes as they are written, never by reading them back: they must
    # still be exactly what is on storage.
    mgr = manager(f"file://{tmp_path}", async_save=async_save)
    save_steps(mgr, [3])
    step_dir = tmp_path / "step-00000003"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    on_disk = {p.name: p.read_bytes() for p in step_dir.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == set(on_disk) == {".metadata", "__0_0.distcp", "trainer_state.json"}
    for name, blob in on_disk.items():
        assert manifest["files"][name] == hashlib.sha256(blob).hexdigest(), name
        assert manifest["sizes"][name] == len(blob), name


def test_async_save_holds_the_state_of_save_time_while_training_goes_on(tmp_path: Path) -> None:
    model, optimizer = trained_pair()
    mgr = manager(f"file://{tmp_path}", model, optimizer, async_save=True)
    model.register_buffer("stat", torch.zeros(3))  # a buffer a forward could change (BatchNorm-like)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    save(mgr, 1, best=1)
    # Training continues at once: the buffer changes in the next forward, parameters in the next step
    # (which first waits for the background copy of the state).
    model.stat.add_(5.0)
    model(torch.randn(16, 4)).sum().backward()
    optimizer.step()
    mgr.close()
    assert not torch.equal(model[0].weight, saved["0.weight"])  # the step did change the weights
    fresh_model, fresh_opt = trained_pair(seed=1)
    fresh_model.register_buffer("stat", torch.ones(3))
    loaded = manager(f"file://{tmp_path}", fresh_model, fresh_opt)
    loaded.restore(loaded.latest())
    for key, value in fresh_model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert mgr.blocked_s > 0


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    mgr = manager(f"file://{tmp_path}", keep_last=3)
    save_steps(mgr, [1, 2, 3])
    data_file = next((tmp_path / "step-00000003").glob("*.distcp"))
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data_file.write_bytes(bytes(blob))
    (tmp_path / "step-00000002" / ".metadata").write_bytes(b"truncated")
    fresh = manager(f"file://{tmp_path}")
    assert fresh.latest() == 1
    assert any("step-00000003 skipped" in e and "does not match its sha256" in e for e in fresh.events)
    assert any("step-00000002 skipped" in e for e in fresh.events)


def test_save_killed_before_its_manifest_is_never_used_and_is_cleaned_up(tmp_path: Path) -> None:
    mgr = manager(f"file://{tmp_path}")
    save_steps(mgr, [1, 2])
    (tmp_path / "step-00000002" / "manifest.json").unlink()  # as if killed after the data files
    fresh = manager(f"file://{tmp_path}")
    assert fresh.latest() == 1
    fresh.discard_after(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_retention_keeps_last_k_the_best_and_the_resume_point(tmp_path: Path) -> None:
    mgr = manager(f"file://{tmp_path}", keep_last=2)
    mgr.protected.add(2)
    save_steps(mgr, [1, 2, 3, 4, 5, 6], best=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-0000000{s}" for s in (2, 3, 5, 6)]


def test_resume_with_another_config_is_refused_unless_allowed(tmp_path: Path) -> None:
    save_steps(manager(f"file://{tmp_path}"), [4])
    with pytest.raises(CheckpointError, match=r"config hash cfg != other.*checkpoint.allow_mismatch=true"):
        manager(f"file://{tmp_path}", config_hash="other").load()
    assert manager(f"file://{tmp_path}", config_hash="other", allow_mismatch=True).load() == 4


class _Payload:
    """Unpickling this runs ``os.system`` - a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bearing_checkpoint_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_steps(manager(f"file://{root}"), [1])
    marker = tmp_path / "pwned"
    step_dir = root / "step-00000001"
    # Even with a manifest that vouches for it, the crafted .metadata must not execute.
    (step_dir / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][".metadata"] = hashlib.sha256((step_dir / ".metadata").read_bytes()).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    mgr = manager(f"file://{root}")
    assert mgr.latest() is None  # the only checkpoint is not valid
    assert any(".metadata refused" in e and "system, which is not allowed" in e for e in mgr.events)
    with pytest.raises(CheckpointError, match="refused.*system, which is not allowed"):
        mgr.restore(1)
    assert not marker.exists()


def test_a_tensor_file_that_is_not_tensors_is_refused_without_running_it(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_steps(manager(f"file://{root}"), [1])
    marker = tmp_path / "pwned"
    step_dir = root / "step-00000001"
    blob = pickle.dumps(_Payload(marker))
    (step_dir / "__0_0.distcp").write_bytes(blob)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["__0_0.distcp"] = hashlib.sha256(blob).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    mgr = manager(f"file://{root}")
    with pytest.raises(
        CheckpointError, match="step-00000001 refused: its files do not load as this model's state"
    ):
        mgr.restore(1)
    assert not marker.exists()


def vouch(step_dir: Path, *names: str) -> None:
    """Make the manifest vouch for the current bytes of ``names`` (an attacker who can write both)."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = hashlib.sha256((step_dir / name).read_bytes()).hexdigest()
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def torch_saved(obj: object) -> bytes:
    """``obj`` as ``torch.save`` writes it: the form DCP stores a bytes item in."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def plant_bytes_entry(step_dir: Path, fqn: str, payload: bytes) -> None:
    """Re-declare the tensor ``fqn`` of a genuine checkpoint as a DCP bytes item whose bytes are
    ``payload``, in a ``.metadata`` made only of allow-listed classes, and vouch for it in the manifest."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from trainer.checkpoint.integrity import parse_metadata

    metadata = parse_metadata((step_dir / ".metadata").read_bytes())
    assert fqn in metadata.state_dict_metadata
    metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
    metadata.storage_data = {i: info for i, info in metadata.storage_data.items() if i.fqn != fqn}
    metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo("__9_0.distcp", 0, len(payload))
    (step_dir / "__9_0.distcp").write_bytes(payload)
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    vouch(step_dir, ".metadata", "__9_0.distcp")


def test_a_bytes_entry_in_metadata_is_refused_runs_nothing_and_the_previous_checkpoint_is_used(
    tmp_path: Path,
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    root = tmp_path / "ckpt"
    model, _ = save_steps(manager(f"file://{root}"), [1, 2])
    marker = tmp_path / "pwned"
    step_dir = root / "step-00000002"
    plant_bytes_entry(step_dir, "model.0.weight", torch_saved(_Payload(marker)))
    # The crafted checkpoint is a live exploit: stock DCP loading runs its payload.
    dcp.load({"model.0.weight": torch.zeros(8, 4)}, storage_reader=FileSystemReader(step_dir), no_dist=True)
    assert marker.exists()
    marker.unlink()

    fresh_model, fresh_opt = trained_pair(seed=1)
    mgr = manager(f"file://{root}", fresh_model, fresh_opt)
    assert mgr.latest() == 1
    assert any(
        "step-00000002 skipped: .metadata refused" in e and "model.0.weight is a bytes item" in e
        for e in mgr.events
    )
    mgr.restore(1)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True)
    )
    # Loading that step directly (not through latest()) is refused as a terminal error.
    with pytest.raises(
        CheckpointError, match="step-00000002 refused.*model.0.weight is a bytes item"
    ) as info:
        mgr.restore(2)
    assert info.value.exit_code == 65
    with pytest.raises(CheckpointError, match="step-00000002 refused.*bytes item"):
        mgr.load_model(2)
    assert not marker.exists()


def test_the_load_planner_refuses_bytes_items_without_unpickling_them(tmp_path: Path) -> None:
    # Defense in depth behind the metadata check: DCP's own planner torch.load()s bytes items with
    # weights_only=False; ours refuses them.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    from trainer.checkpoint.integrity import TensorsOnlyLoadPlanner
    from trainer.checkpoint.storage_errors import causes

    marker = tmp_path / "pwned"
    dcp.save({"obj": _Payload(marker)}, storage_writer=FileSystemWriter(tmp_path / "ckpt"), no_dist=True)
    with pytest.raises(CheckpointException) as info:
        dcp.load(
            {"obj": None},
            storage_reader=FileSystemReader(tmp_path / "ckpt"),
            planner=TensorsOnlyLoadPlanner(),
            no_dist=True,
        )
    (refusal,) = [c for c in causes(info.value) if isinstance(c, CheckpointError)]
    assert "checkpoint entry obj is a bytes item" in str(refusal)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("label", "malformed"),
    [
        ("a list", lambda m: []),
        ("null", lambda m: None),
        ("a number", lambda m: 1),
        ("a string", lambda m: "x"),
        ("step is a string", lambda m: {**m, "step": "2"}),
        ("step is a bool", lambda m: {**m, "step": True}),
        ("step is missing", lambda m: {k: v for k, v in m.items() if k != "step"}),
        ("files is a list", lambda m: {**m, "files": list(m["files"])}),
        ("a digest is a number", lambda m: {**m, "files": {**m["files"], ".metadata": 5}}),
        (
            "a name is a path",
            lambda m: {**m, "files": {**m["files"], "../step-00000001/.metadata": "0" * 64}},
        ),
        ("no .metadata", lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != ".metadata"}}),
    ],
)
def test_a_malformed_manifest_is_skipped_with_a_reason_and_refused_by_load(
    tmp_path: Path, label: str, malformed: Any
) -> None:
    save_steps(manager(f"file://{tmp_path}"), [1, 2])
    path = tmp_path / "step-00000002" / "manifest.json"
    path.write_text(json.dumps(malformed(json.loads(path.read_text()))))
    mgr = manager(f"file://{tmp_path}")
    assert mgr.latest() == 1, label
    assert any("step-00000002 skipped: manifest.json is malformed" in e for e in mgr.events), mgr.events
    expected = r"step-00000002/manifest.json is malformed \(.+\)\. Delete the step directory"
    with pytest.raises(CheckpointError, match=expected):
        mgr.restore(2)
    with pytest.raises(CheckpointError, match=expected):
        mgr.load_model(2)


@pytest.mark.parametrize("content", ["[]", '{"loop": {}}', '{"loop": 3, "optimizer_param_groups": []}'])
def test_a_malformed_trainer_state_is_skipped_and_refused_by_load(tmp_path: Path, content: str) -> None:
    save_steps(manager(f"file://{tmp_path}"), [1, 2])
    step_dir = tmp_path / "step-00000002"
    (step_dir / "trainer_state.json").write_text(content)
    vouch(step_dir, "trainer_state.json")
    mgr = manager(f"file://{tmp_path}")
    assert mgr.latest() == 1
    assert any("step-00000002 skipped: trainer_state.json refused" in e for e in mgr.events), mgr.events
    with pytest.raises(CheckpointError, match="step-00000002 refused: trainer_state.json .*Delete the step"):
        mgr.restore(2)


def test_a_manifest_that_is_not_json_is_refused_by_load(tmp_path: Path) -> None:
    save_steps(manager(f"file://{tmp_path}"), [1])
    (tmp_path / "step-00000001" / "manifest.json").write_text('{"step": 1, "files": ')
    mgr = manager(f"file://{tmp_path}")
    assert mgr.latest() is None
    assert any("step-00000001 skipped: manifest.json is not valid JSON" in e for e in mgr.events)
    with pytest.raises(
        CheckpointError, match=r"step-00000001/manifest.json is not valid JSON.*Delete the step"
    ):
        mgr.restore(1)


def test_a_file_changed_after_latest_is_caught_while_loading(tmp_path: Path) -> None:
    save_steps(manager(f"file://{tmp_path}"), [1])
    other = manager(f"file://{tmp_path}")
    data_file = tmp_path / "step-00000001" / "__0_0.distcp"
    blob = bytearray(data_file.read_bytes())
    blob[-10] ^= 0xFF
    data_file.write_bytes(bytes(blob))
    with pytest.raises(
        CheckpointError, match=r"__0_0.distcp does not match its sha256 in manifest.json \(corrupt\)"
    ):
        other.restore(1)  # no latest() first: restoring verifies what it reads


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS", "EACCES"])
def test_full_or_read_only_destination_is_terminal_and_names_the_fix(errno_name: str) -> None:
    import errno as errno_module

    from torch.distributed.checkpoint.api import CheckpointException

    from trainer.checkpoint.storage_errors import storage_error

    code = getattr(errno_module, errno_name)
    cause = OSError(code, os.strerror(code))
    # As DCP reports it: a rank's failure wrapped in a CheckpointException, (exception, traceback).
    error = storage_error("s3://bucket/ckpt", CheckpointException("write", {1: (cause, None)}))
    assert isinstance(error, CheckpointError)
    assert "checkpoint destination s3://bucket/ckpt" in str(error) and "checkpoint.uri" in str(error)
    assert isinstance(storage_error("s3://b", ConnectionError("refused")), RetryableError)


class S3Endpoint:
    """A moto S3 server on loopback that a test can take away and bring back (state is kept)."""

    def __init__(self) -> None:
        from trainer_testkit import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """A bucket "ckpt" on a real S3 HTTP endpoint on loopback (moto server)."""
    import boto3

    endpoint = S3Endpoint()
    endpoint.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CTRAIN_S3_ENDPOINT_URL": endpoint.url,
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint.url).create_bucket(Bucket="ckpt")
    yield endpoint
    endpoint.stop()


def test_s3_round_trip_through_the_http_endpoint(s3: S3Endpoint) -> None:
    uri = "s3://ckpt/runs/key"
    model, optimizer = save_steps(manager(uri), [10, 20])
    other_model, other_opt = trained_pair(seed=5)
    fresh = manager(uri, other_model, other_opt)
    assert fresh.load() == 20
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other_model.state_dict().values(), strict=True)
    )


def test_s3_outage_during_save_is_retryable_and_never_becomes_latest(s3: S3Endpoint) -> None:
    uri = "s3://ckpt/runs/outage"
    mgr = manager(uri, async_save=False)
    save_steps(mgr, [10])
    s3.stop()  # the endpoint goes away mid-run
    with pytest.raises(RetryableError, match="checkpoint storage"):
        mgr.save(20)
    s3.start()  # back, with its state: a rerun resumes from the last committed step
    assert manager(uri).latest() == 10


# ---- portability across CPython 3.11 patch releases ----------------------------------------------
def _getattr_pickle(module: str, qualname: str, name: str) -> bytes:
    """The opcode stream early CPython 3.11 releases write for an Enum member: getattr(Class, 'NAME')."""
    text = name.encode()
    return (
        b"\x80\x02"  # PROTO 2
        + b"cbuiltins\ngetattr\n"  # GLOBAL builtins.getattr
        + f"c{module}\n{qualname}\n".encode()  # GLOBAL the class
        + b"X" + len(text).to_bytes(4, "little") + text  # BINUNICODE the member name
        + b"\x86R."  # TUPLE2, REDUCE, STOP
    )


def test_an_enum_member_pickled_through_getattr_loads_to_that_member() -> None:
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from trainer.checkpoint.integrity import MetadataUnpickler

    blob = _getattr_pickle("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "TORCH_CHANNELS_LAST")
    assert "builtins getattr" in _disassembly(blob)
    assert MetadataUnpickler(io.BytesIO(blob)).load() is _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST


def test_a_whole_metadata_written_the_early_3_11_way_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from trainer.checkpoint.integrity import parse_metadata

    save_steps(manager(f"file://{tmp_path}"), [1])
    genuine = parse_metadata((tmp_path / "step-00000001" / ".metadata").read_bytes())
    monkeypatch.setattr(
        _MEM_FORMAT_ENCODING, "__reduce_ex__", lambda self, protocol: (getattr, (type(self), self.name))
    )
    blob = pickle.dumps(genuine)
    assert "'getattr'" in _disassembly(blob)  # protocol 4: STACK_GLOBAL of 'builtins', 'getattr'
    monkeypatch.undo()
    parsed = parse_metadata(blob)
    assert parsed.state_dict_metadata.keys() == genuine.state_dict_metadata.keys()
    properties = {fqn: entry.properties for fqn, entry in parsed.state_dict_metadata.items()}
    assert properties == {fqn: entry.properties for fqn, entry in genuine.state_dict_metadata.items()}


@pytest.mark.parametrize(
    ("module", "qualname", "name"),
    [
        ("torch", "Size", "__class__"),  # allow-listed, but not an Enum
        ("torch.distributed.checkpoint.metadata", "MetadataIndex", "__init__"),  # allow-listed, not an Enum
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "__class__"),  # not a member name
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "_member_map_"),
        ("signal", "Signals", "SIGKILL"),  # an Enum, not allow-listed
        ("os", "system", "__call__"),
    ],
)
def test_getattr_on_anything_but_an_allowed_enum_member_is_refused(module: str, qualname: str, name: str) -> None:
    from trainer.checkpoint.integrity import MetadataUnpickler

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        MetadataUnpickler(io.BytesIO(_getattr_pickle(module, qualname, name))).load()


def _disassembly(blob: bytes) -> str:
    import pickletools

    out = io.StringIO()
    pickletools.dis(blob, out)
    return out.getvalue()
