"""Bookkeeping across failures, on real 2-process gloo runs (torchrun) and a real MLflow sqlite store.

- One MLflow run whatever dies, also before the first checkpoint commit (the run id lives in the lease).
- Losing rank 0 restarts promptly: the survivor leaves on torchrun's SIGTERM instead of being SIGKILLed.
- A rerun refused at resume (another config) leaves the finished run's MLflow run and result.json alone.
- A lease on the checkpoint directory keeps a second trainer off it (exit 75); an expired one is taken over.
- A kill during export leaves exactly one READY logged model after the rerun.
- The first step/* point after a resume averages a full interval; the resume log line names the right epoch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from mlflow import MlflowClient
from test_checkpoint import s3  # noqa: F401  (a fixture)
from test_checkpoint_faults import CTX, assert_same_weights, committed_steps, epoch_points
from trainer_testkit import TrainerRun

from trainer.lease import Lease, LeaseHeld
from trainer.model import mlp
from trainer.storage import filesystem

if TYPE_CHECKING:
    from mlflow.entities import Run
    from torch import nn

    from trainer.model import ModelSpec

TESTS = Path(__file__).resolve().parent
KILL_IN_EXPORT_ATTEMPT = "CTRAIN_TEST_KILL_IN_EXPORT_ATTEMPT"
# What torchrun logs when a worker ignored its SIGTERM for the whole grace period and had to be killed.
FORCED_KILL = "forcefully exiting via"


# ---- helpers -----------------------------------------------------------------------------------
def export_killing_mlp(spec: ModelSpec, **kwargs: Any) -> nn.Module:
    """``mlp`` (same parameters, same init) that SIGKILLs its process while ``torch.export`` traces
    it after training - i.e. inside MLflow's ``log_model``, after the logged model was created, not in
    the export check before the first step - on the torchrun attempt named by
    ``$CTRAIN_TEST_KILL_IN_EXPORT_ATTEMPT``."""
    model = mlp(spec, **kwargs)
    trained: list[bool] = []

    def kill_while_exporting(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if module.training:
            trained.append(True)
        elif torch.compiler.is_exporting() and trained and attempt == os.environ.get(KILL_IN_EXPORT_ATTEMPT):
            logging.getLogger("trainer").warning("test hook: SIGKILL during export")
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    model.register_forward_pre_hook(kill_while_exporting)
    return model


def module_env(**extra: str) -> dict[str, str]:
    """Environment for a run whose model factory lives in this test module."""
    return {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}


def all_runs(run: TrainerRun) -> list[Run]:
    """Every MLflow run in the store, whatever experiment (``Default`` included)."""
    client = MlflowClient(run.tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def failure_record(run: TrainerRun) -> dict[str, Any]:
    return json.loads((run.tmp / "output" / "failure.json").read_text())


def write_lease(run: TrainerRun, **fields: Any) -> Path:
    path = run.checkpoint_dir() / "lease.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "owner": "other-host:4242:job-a",
        "expires_at": time.time() + 600,
        "ttl_s": 60.0,
        "config_hash": "0000000000000000",
        "mlflow_run_id": None,
        "released": False,
        **fields,
    }
    path.write_text(json.dumps(record))
    return path


def step_series(run: TrainerRun, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(run.tracking_uri)
    history = client.get_metric_history(run.result()["mlflow_run_id"], key)
    return sorted((m.step, m.value) for m in history)


def lease_uri(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if where == "s3":
        request.getfixturevalue("s3")
        return f"s3://ckpt/runs/lease-{uuid.uuid4().hex}"
    return f"file://{tmp_path / 'checkpoints'}"


def stored_lease(uri: str) -> dict[str, Any] | None:
    fs, root = filesystem(uri)
    return json.loads(fs.cat_file(f"{root}/lease.json")) if fs.exists(f"{root}/lease.json") else None


def store_lease(uri: str, **record: Any) -> None:
    fs, root = filesystem(uri)
    fs.pipe_file(f"{root}/lease.json", json.dumps(record).encode())


# ---- lease, in one process ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["file", "s3"])
def test_lease_refuses_a_live_holder_and_hands_over_released_expired_and_lost_ones(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = lease_uri(where, tmp_path, request)
    a = Lease.acquire(uri, CTX, config_hash="h1", owner="job-a")
    a.record_run("run-a")
    assert stored_lease(uri)["mlflow_run_id"] == "run-a"
    with pytest.raises(LeaseHeld, match=f"checkpoint directory {uri} is leased by job-a until 20"):
        Lease.acquire(uri, CTX, config_hash="h1", owner="job-b")
    assert stored_lease(uri)["owner"] == "job-a"

    a.release(keep_run=True)  # a retryable failure: the next attempt continues run-a
    assert stored_lease(uri)["released"] is True
    b = Lease.acquire(uri, CTX, config_hash="h1", owner="job-b")
    assert b.run_id == "run-a"
    b.release()
    assert stored_lease(uri) is None

    # A dead holder's expired lease of another config: taken over, its run not continued.
    store_lease(uri, owner="job-dead", lease_id="x", expires_at=time.time() - 1, config_hash="h0",
                mlflow_run_id="run-dead")  # fmt: skip
    c = Lease.acquire(uri, CTX, config_hash="h1", owner="job-c", ttl_s=0.4)
    assert c.run_id is None and stored_lease(uri)["owner"] == "job-c"
    c.check()  # still ours

    # Someone takes it while c runs (c stalled past its expiry): c's renewal notices, c stops.
    store_lease(uri, owner="job-x", lease_id="y", expires_at=time.time() + 60, config_hash="h1")
    time.sleep(0.3)  # > one renewal period (ttl / 4)
    with pytest.raises(LeaseHeld, match="was taken over by job-x"):
        c.check()
    c.release()
    assert stored_lease(uri)["owner"] == "job-x"  # left alone


def test_a_live_lease_whose_process_on_this_host_is_gone_is_taken_over(tmp_path: Path) -> None:
    # A trainer killed with its whole tree (storage down, Airflow killing the task) cannot release its
    # lease; on the same host and pid namespace its death is provable, so the retry need not wait.
    import socket

    (tmp_path / "checkpoints").mkdir()
    uri = f"file://{tmp_path / 'checkpoints'}"
    namespace = os.readlink("/proc/self/ns/pid")
    with subprocess.Popen(["sleep", "60"]) as alive:
        dead = subprocess.Popen(["true"])
        dead.wait()
        here = {"lease_id": "x", "expires_at": time.time() + 60, "config_hash": "h1", "host": socket.gethostname()}
        store_lease(uri, owner="job-alive", pid=alive.pid, pid_namespace=namespace, **here)
        with pytest.raises(LeaseHeld, match="leased by job-alive"):
            Lease.acquire(uri, CTX, config_hash="h1", owner="job-b")
        store_lease(uri, owner="job-elsewhere", pid=dead.pid, pid_namespace="pid:[1]", **here)
        with pytest.raises(LeaseHeld, match="leased by job-elsewhere"):  # another container's pid
            Lease.acquire(uri, CTX, config_hash="h1", owner="job-b")
        store_lease(uri, owner="job-dead", pid=dead.pid, pid_namespace=namespace, **here)
        taken = Lease.acquire(uri, CTX, config_hash="h1", owner="job-b")
        assert stored_lease(uri)["owner"] == "job-b"
        taken.release()
        alive.kill()


@pytest.mark.parametrize("where", ["file", "s3"])
def test_of_eight_trainers_taking_a_lease_at_once_exactly_one_gets_it(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = lease_uri(where, tmp_path, request)
    start = threading.Barrier(8)

    def take(owner: str) -> Lease | LeaseHeld:
        start.wait()
        try:
            return Lease.acquire(uri, CTX, config_hash="h1", owner=owner)
        except LeaseHeld as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(take, [f"job-{i}" for i in range(8)]))
    (winner,) = [o for o in outcomes if isinstance(o, Lease)]
    assert sum(isinstance(o, LeaseHeld) for o in outcomes) == 7
    assert stored_lease(uri)["owner"] == winner.owner
    winner.release()


@pytest.mark.slow  # 2-process torchrun runs
# ---- one MLflow run, prompt restart --------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_worker_death_before_the_first_checkpoint_keeps_one_mlflow_run(
    finished: TrainerRun, trainer_run: TrainerRun, rank: int
) -> None:
    # Step 3 is before the first checkpoint (step 10): only the lease knows the run id at that point.
    proc = trainer_run(nproc=2, max_restarts=1, faults={"kill_at_step": 3, "kill_rank": rank})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fault injection: SIGKILL at step 3" in proc.stderr
    assert "resumed from" not in proc.stderr
    (run,) = all_runs(trainer_run)
    assert run.info.run_id == trainer_run.result()["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert epoch_points(trainer_run, "val_loss") == [1, 2, 3]
    assert epoch_points(trainer_run, "train_loss") == [1, 2, 3]
    assert_same_weights(trainer_run, finished)  # trained from scratch again, same seed
    # The survivor left on torchrun's SIGTERM: the restart did not wait out the 30 s grace period.
    assert FORCED_KILL not in proc.stderr
    assert not (trainer_run.checkpoint_dir() / "lease.json").exists()  # given up at the end


@pytest.mark.slow  # 2-process torchrun runs
# ---- refused rerun -----------------------------------------------------------------------------
def test_rerun_refused_at_resume_leaves_the_finished_run_alone(
    finished: TrainerRun, tmp_path: Path, snapshot_uri: str
) -> None:
    shutil.copytree(finished.tmp, tmp_path / "run")
    run = TrainerRun(tmp_path / "run", snapshot_uri)
    result_before = (run.tmp / "output" / "result.json").read_bytes()
    runs_before = {r.info.run_id: r.info.status for r in all_runs(run)}

    proc = run("optimizer.lr=0.02", nproc=2)  # another hashed config on the same URIs
    assert proc.returncode != 0
    assert "was written by a different run (config hash" in proc.stderr
    # No stray run (MLflow's fluent API starts one in "Default" when tagged without an active run).
    assert {r.info.run_id: r.info.status for r in all_runs(run)} == runs_before
    client = MlflowClient(run.tracking_uri)
    assert client.search_runs(["0"]) == []
    assert "last_failure" not in client.get_run(finished.result()["mlflow_run_id"]).data.tags
    # The finished result stays; the failure (and its exit code) is in failure.json beside it.
    assert (run.tmp / "output" / "result.json").read_bytes() == result_before
    failure = failure_record(run)
    assert failure["status"] == "failed" and failure["exit_code"] == 65 and failure["retryable"] is False
    assert "was written by a different run" in failure["error"]
    assert failure["mlflow_run_id"] is None
    assert not (run.checkpoint_dir() / "lease.json").exists()


@pytest.mark.slow  # 2-process torchrun runs
# ---- lease -------------------------------------------------------------------------------------
def test_a_live_lease_of_another_trainer_stops_the_run_with_exit_75(trainer_run: TrainerRun) -> None:
    lease = write_lease(trainer_run)
    held = lease.read_bytes()
    proc = trainer_run(nproc=2)
    assert proc.returncode != 0
    failure = failure_record(trainer_run)
    assert failure["exit_code"] == 75 and failure["retryable"] is True
    error = failure["error"]
    assert f"checkpoint directory {trainer_run.checkpoint_uri} is leased by other-host:4242:job-a" in error
    assert "until 20" in error  # the expiry, as a UTC timestamp
    assert "delete" in error and "lease.json" in error  # what to do if that trainer is known dead
    assert "is leased by other-host:4242:job-a" in proc.stderr
    assert lease.read_bytes() == held  # the holder's lease is untouched
    assert committed_steps(trainer_run.checkpoint_dir()) == []  # nothing trained
    assert sorted(p.name for p in trainer_run.checkpoint_dir().iterdir()) == ["lease.json"]
    assert not (trainer_run.tmp / "output" / "result.json").exists()  # the holder owns that file
    assert all_runs(trainer_run) == []


@pytest.mark.slow  # 2-process torchrun runs
def test_an_expired_lease_is_taken_over_and_the_run_finishes(trainer_run: TrainerRun) -> None:
    # A dead trainer's lease, from another config: taken over, and its MLflow run id is not reused.
    write_lease(trainer_run, expires_at=time.time() - 1, mlflow_run_id="0123456789abcdef0123456789abcdef")
    proc = trainer_run("train.max_steps=3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the expired lease of other-host:4242:job-a" in proc.stderr
    assert trainer_run.result()["status"] == "succeeded"
    (run,) = all_runs(trainer_run)
    assert run.info.status == "FINISHED" and run.info.run_id == trainer_run.result()["mlflow_run_id"]
    assert not (trainer_run.checkpoint_dir() / "lease.json").exists()


@pytest.mark.slow  # 2-process torchrun runs
def test_two_trainers_started_together_one_trains_and_the_other_exits_75(trainer_run: TrainerRun) -> None:
    procs: list[subprocess.CompletedProcess[str]] = []
    # Slowed down so that the winner still holds the lease when the other one looks.
    threads = [
        threading.Thread(target=lambda: procs.append(trainer_run(nproc=2, faults={"step_delay_s": 0.1})))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner, loser = sorted(procs, key=lambda p: p.returncode)
    assert winner.returncode == 0, winner.stderr[-3000:]
    assert loser.returncode != 0
    assert f"checkpoint directory {trainer_run.checkpoint_uri} is leased by" in loser.stderr
    assert "fault injection" not in loser.stderr and "epoch 1" not in loser.stderr  # it never trained
    assert trainer_run.result()["status"] == "succeeded"
    assert failure_record(trainer_run)["exit_code"] == 75
    (run,) = all_runs(trainer_run)
    assert run.info.status == "FINISHED"
    assert epoch_points(trainer_run, "val_loss") == [1, 2, 3]


@pytest.mark.slow  # 2-process torchrun runs
# ---- kill during export; exact metrics after resume ---------------------------------------------
def test_kill_in_export_leaves_one_ready_model_and_resumed_metrics_are_exact(
    finished: TrainerRun, trainer_run: TrainerRun
) -> None:
    # Attempt 0: rank 1 dies before step 8; checkpoints every 3 steps, so it resumes from step 6, one
    # step into the 5-step logging interval 6..10. Attempt 1 trains to the end and rank 0 dies inside
    # MLflow's log_model. Attempt 2 resumes from the final checkpoint and exports again.
    proc = trainer_run(
        "model.factory=test_run_bookkeeping:export_killing_mlp",
        "model.kwargs={hidden_sizes: [16], dropout: 0.1}",  # debug.yaml's, so the reference's weights
        "checkpoint.every_steps=3",
        nproc=2,
        max_restarts=2,
        env=module_env(**{KILL_IN_EXPORT_ATTEMPT: "1"}),
        # step_delay_s: time for the async step-6 save to commit before the kill
        faults={"kill_at_step": 8, "kill_rank": 1, "step_delay_s": 0.05},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test hook: SIGKILL during export" in proc.stderr

    result = trainer_run.result()
    client = MlflowClient(trainer_run.tracking_uri)
    (run,) = all_runs(trainer_run)
    models = [
        m
        for m in client.search_logged_models([run.info.experiment_id])
        if m.source_run_id == result["mlflow_run_id"]
    ]
    assert [(m.name, str(m.status)) for m in models] == [("model", "READY")]
    assert result["model_uri"].startswith("models:/m-")  # the logged model itself, not a runs:/ path
    assert_same_weights(trainer_run, finished)

    # Every step/* point, the one right after the resume included, averages the same 5 steps as the
    # uninterrupted run's (only the order of a float64 sum over ranks can differ).
    for key in ("step/loss", "step/grad_norm", "step/lr"):
        ours, reference = step_series(trainer_run, key), step_series(finished, key)
        assert [s for s, _ in ours] == [s for s, _ in reference] == [5, 10, 15, 20, 25, 30], key
        assert [v for _, v in ours] == pytest.approx([v for _, v in reference], rel=1e-9), key
    uri = trainer_run.checkpoint_uri
    assert f"resumed from {uri}/step-00000006 (epoch 1, step 6: 6 of its 10 steps done)" in proc.stderr
    assert f"resumed from {uri}/step-00000030 (after epoch 3, step 30)" in proc.stderr


# ---- a config refused at load -----------------------------------------------------------------------
@pytest.mark.slow  # a 2-process torchrun
def test_a_config_refused_at_load_leaves_its_failure_record_under_torchrun(trainer_run: TrainerRun) -> None:
    """Before any process group exists every rank refuses the config; torchrun stops the others when the
    first exits, so the record must not depend on rank 0 outliving them (in a container, failure.json once
    went missing that way; here the race is rarely lost, so this test guards the behaviour, not the race)."""
    proc = trainer_run("train.batch_size=0", nproc=2)
    assert proc.returncode != 0
    failure = failure_record(trainer_run)
    assert failure["status"] == "failed" and failure["exit_code"] == 65 and failure["retryable"] is False
    assert "batch_size" in failure["error"] and failure["mlflow_run_id"] is None
    assert trainer_run.runs() == []
