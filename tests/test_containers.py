"""The training task in real containers: the docker launcher (Docker engine) and the kubernetes launcher's
Pod under ``podman kube play``, on a real dataset snapshot, with the images `make images` builds.

Slow tier. The images come from ``scripts/images.sh`` (built once, then reused by their input hash).
Skipped, with the script's reason, only where no engine can be started (not root, packages missing on a
dev box); under CI (``CI=1``) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ctrain.errors import TrainingFailed
from ctrain.launchers import CONTAINER_LABEL, DockerLauncher, KubernetesLauncher, TrainingJob, local_paths

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "training_image" / "configs" / "debug.yaml"
SECRET = "not-a-real-secret-0123456789"
BUCKET = "ctrain-containers"  # not test_secrets.py's "ctrain": moto's state is per process, not per server


@pytest.fixture(scope="session")
def engine() -> dict[str, str]:
    """Build or reuse the training image (and its podman copy) with the project's script; the env that
    reaches the engine and podman, also applied to this process."""
    started = time.monotonic()
    proc = subprocess.run(["bash", "scripts/images.sh", "engine", "trainer", "pod-image", "env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        reason = f"scripts/images.sh could not provide the images (exit {proc.returncode}): {proc.stderr[-1500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    print(f"images ready in {time.monotonic() - started:.0f} s:\n{proc.stderr}")
    env = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def docker_client(engine):
    import docker

    client = docker.from_env()
    yield client
    client.close()


def _job(dataset_uri: str, out: Path, **overrides: str) -> TrainingJob:
    return TrainingJob(
        config_path=str(DEBUG_CONFIG),
        overrides={"data.dataset_uri": dataset_uri, "checkpoint.uri": f"file://{out}/checkpoints",
                   "output.uri": f"file://{out}/output", **overrides},
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{out}/mlflow.db", "OMP_NUM_THREADS": "1"},
        nproc_per_node=2,
    )


def _mounts(settings, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return local_paths([settings.resolved_object_root, f"file://{out}"])


def _assert_trained(out: Path) -> dict:
    result = json.loads((out / "output" / "result.json").read_text())
    assert result["status"] == "succeeded" and result["world_size"] == 2, result
    assert result["global_step"] > 0
    assert any((out / "checkpoints").iterdir()), "no checkpoint written"
    return result


def _ours(client, name: str) -> list:
    return client.containers.list(all=True, filters={"label": CONTAINER_LABEL, "name": name})


def test_docker_launcher_trains_two_processes_in_a_container(engine, docker_client, dp_snapshot, tmp_path,
                                                             monkeypatch):
    settings, info = dp_snapshot
    out = tmp_path / "out"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # a PASSTHROUGH_ENV credential: env only, never argv
    launcher = DockerLauncher(engine["CTRAIN_TRAINING_IMAGE"], mounts=_mounts(settings, out))
    name = f"ctrain-test-{os.getpid()}"
    inspected: dict = {}
    lines: list[str] = []

    def sink(line: str) -> None:
        lines.append(line)
        if not inspected and len(lines) > 1:  # the container is running: look at what docker holds
            inspected.update(docker_client.api.inspect_container(name))

    started = time.monotonic()
    launcher.run(_job(info.uri, out), sink, name=name)
    print(f"docker launcher: 2-process debug run in {time.monotonic() - started:.0f} s")

    result = _assert_trained(out)
    assert result["metrics"], result
    # the trainer's own log lines reached the sink (the task log)
    assert any("rank" in line.lower() or "epoch" in line.lower() for line in lines), lines[-20:]
    argv = json.dumps([inspected["Path"], inspected["Args"], inspected["Config"]["Cmd"],
                       inspected["Config"]["Entrypoint"]])
    assert SECRET not in argv and "torchrun" in argv
    assert f"AWS_SECRET_ACCESS_KEY={SECRET}" in inspected["Config"]["Env"]  # by environment
    assert inspected["HostConfig"]["NetworkMode"] == "none" and inspected["Config"]["Hostname"] == "trainer"
    assert inspected["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
    assert _ours(docker_client, name) == [], "the container was not removed"


def test_docker_launcher_reports_a_bad_config_terminally(engine, docker_client, dp_snapshot, tmp_path):
    settings, info = dp_snapshot
    out = tmp_path / "out"
    launcher = DockerLauncher(engine["CTRAIN_TRAINING_IMAGE"], mounts=_mounts(settings, out))
    with pytest.raises(TrainingFailed) as failed:
        launcher.run(_job(info.uri, out, **{"train.batch_size": "0"}), lambda _line: None, name="ctrain-test-bad")
    # torchrun exits 1 for a failed worker; the trainer's own code is in failure.json (pipeline._launch reads it)
    assert failed.value.exit_code == 1
    record = json.loads((out / "output" / "failure.json").read_text())
    assert record["exit_code"] == 65 and "batch_size" in record["error"]
    assert _ours(docker_client, "ctrain-test-bad") == []


_LAUNCH = textwrap.dedent("""
    import json, sys
    from ctrain.launchers import DockerLauncher, TrainingJob
    image, name, mounts, job = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    DockerLauncher(image, mounts=mounts).run(TrainingJob(**job), lambda line: print(line, flush=True), name=name)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killing_the_launcher_stops_and_removes_its_container(engine, docker_client, dp_snapshot, tmp_path, sig):
    """Airflow stops a task with SIGTERM (then SIGKILL): either way no training container is left behind."""
    settings, info = dp_snapshot
    out = tmp_path / "out"
    job = _job(info.uri, out, **{"train.epochs": "100000", "early_stopping.enabled": "false"})
    name = f"ctrain-test-kill-{sig.name.lower()}"
    payload = {"config_path": job.config_path, "overrides": job.overrides, "env": job.env, "nproc_per_node": 2}
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, engine["CTRAIN_TRAINING_IMAGE"], name,
                             json.dumps(_mounts(settings, out)), json.dumps(payload)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # wait until the trainer is past its start-up
            containers = _ours(docker_client, name)
            if containers and "epoch" in containers[0].logs(tail=50).decode().lower():
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("the training container did not start training within 180 s")
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
        if sig == signal.SIGTERM:  # a graceful stop: the launcher's own cleanup ran, not only the reaper
            assert "SIGTERM: stopping the training container" in output, output[-2000:]
        deadline = time.monotonic() + 60
        while _ours(docker_client, name) and time.monotonic() < deadline:
            time.sleep(1)
        assert _ours(docker_client, name) == [], f"container {name} outlived its launcher ({sig.name})"
    finally:
        if proc.poll() is None:
            proc.kill()
        for container in _ours(docker_client, name):
            container.remove(force=True)


def test_kubernetes_pod_trains_under_podman_kube_play(engine, dp_snapshot, tmp_path, monkeypatch):
    settings, info = dp_snapshot
    out = tmp_path / "out"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # reaches the pod through the Secret only
    launcher = KubernetesLauncher(engine["CTRAIN_TRAINING_IMAGE"], cpu="2", memory="4Gi", runtime="podman",
                                  mounts=_mounts(settings, out), run_as=(os.getuid(), os.getgid()),
                                  network="none")
    lines: list[str] = []
    started = time.monotonic()
    launcher.run(_job(info.uri, out), lines.append, name="ctrain-test-pod")
    print(f"podman pod: 2-process debug run in {time.monotonic() - started:.0f} s")
    _assert_trained(out)
    assert any("epoch" in line.lower() for line in lines), lines[-20:]
    pods = subprocess.run(["podman", "pod", "ps", "-q", "--filter", "name=ctrain-test-pod"],
                          capture_output=True, text=True, check=True)
    assert pods.stdout.strip() == "", "the pod was not removed"


@pytest.fixture(scope="session")
def airflow_image(engine) -> str:
    proc = subprocess.run(["bash", "scripts/images.sh", "airflow"], cwd=ROOT, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stderr)
    return "ctrain-airflow:latest"


def test_airflow_image_parses_the_dags_with_ctrain_paths_resolved(docker_client, airflow_image):
    """The compose profile's image: ctrain's default paths exist in it, the DAGs parse, and the docker
    launcher's SDK and the production drivers are there; it runs as uid 1000."""
    script = textwrap.dedent("""
        import json, os
        from pathlib import Path
        from airflow.dag_processing.dagbag import BundleDagBag
        from ctrain.settings import Settings
        import docker, psycopg2, redis, flask_wtf  # the docker launcher's SDK; Postgres; Feast's Redis online store; MLflow basic-auth
        s = Settings()
        folder = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        bag = BundleDagBag(str(folder), bundle_path=folder)
        print(json.dumps({"uid": os.getuid(), "paths": [s.feature_repo.is_dir(), s.pipelines_dir.is_dir(),
                          s.trainer_config.is_file()], "dags": sorted(bag.dag_ids), "errors": bag.import_errors}))
    """)
    out = docker_client.containers.run(airflow_image, ["python", "-c", script], network_mode="none", remove=True,
                                       stderr=False).decode()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["uid"] == 1000 and report["paths"] == [True, True, True], report
    assert not report["errors"], report["errors"]
    assert "continuous_training__fraud" in report["dags"] and "continuous_training__delivery_eta" in report["dags"]


def test_pipeline_train_step_in_a_container_on_s3(engine, docker_client, tmp_path, monkeypatch):
    """CTRAIN_LAUNCHER=docker with an s3:// object root (moto server on loopback): the train step launches
    the training image on the host network with the S3 endpoint and credentials by environment; the
    snapshot is read from S3 and the result and checkpoints land there."""
    import boto3

    from ctrain import pipeline, registry
    from ctrain.settings import get_settings
    from ctrain_examples import fraud
    from support import moto_s3

    home = tmp_path / "home"
    env = {"AWS_ACCESS_KEY_ID": "AKIACONTAINERTEST", "AWS_SECRET_ACCESS_KEY": SECRET, "CTRAIN_HOME": str(home),
           "CTRAIN_OBJECT_ROOT": f"s3://{BUCKET}/objects", "CTRAIN_LAUNCHER": "docker",
           "CTRAIN_TRAINING_IMAGE": engine["CTRAIN_TRAINING_IMAGE"],
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    output: list[str] = []
    with moto_s3(monkeypatch, env, BUCKET) as endpoint:
        settings = get_settings()
        fraud.generate(settings.resolved_data_root, days=20, start="2026-01-01", rows_per_day=400, seed=0)
        snapshot = pipeline.build_dataset(settings)
        validation = pipeline.validate(settings, snapshot)
        training = pipeline.train(settings, snapshot, validation, settings.definition.dag_id, "manual__container",
                                  {"train.epochs": 2}, sink=output.append)
        keys = [item["Key"] for page in boto3.client("s3", endpoint_url=endpoint).get_paginator(
                "list_objects_v2").paginate(Bucket=BUCKET) for item in page.get("Contents", [])]
    text = "\n".join(output)
    assert "launching container" in text and "network host" in text, text[:2000]
    assert snapshot["uri"].startswith(f"s3://{BUCKET}/objects/datasets/")
    assert training["status"] == "succeeded" and training["world_size"] == 2
    assert f"objects/runs/{training['run_key']}/result.json" in keys
    assert any(k.startswith(f"objects/checkpoints/{training['run_key']}/") for k in keys)
    assert SECRET not in text  # the launch line holds the command, never the credentials
    run = registry.get_client(settings).get_run(training["mlflow_run_id"])
    assert run.info.status == "FINISHED"


def test_a_killed_training_container_is_retryable_and_the_retry_resumes(engine, docker_client, tmp_path,
                                                                         monkeypatch):
    """The container dies mid-run (SIGKILL): the train step fails retryably (-9), the MLflow run is not left
    RUNNING, and the retry resumes from the container's last checkpoint into the same run."""
    from ctrain import pipeline, registry
    from ctrain.settings import get_settings
    from ctrain_examples import fraud

    for key in [k for k in os.environ if k.startswith(("CTRAIN_", "MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CTRAIN_LAUNCHER", "docker")
    monkeypatch.setenv("CTRAIN_TRAINING_IMAGE", engine["CTRAIN_TRAINING_IMAGE"])
    settings = get_settings()
    fraud.generate(settings.resolved_data_root, days=20, start="2026-01-01", rows_per_day=400, seed=0)
    snapshot = pipeline.build_dataset(settings)
    validation = pipeline.validate(settings, snapshot)
    overrides = {"train.epochs": 6, "early_stopping.enabled": False}
    killed: list[str] = []

    def kill_after_second_epoch(line: str) -> None:
        if "epoch 2 eval" in line and not killed:
            (container,) = docker_client.containers.list(filters={"label": CONTAINER_LABEL})
            killed.append(container.name)
            container.kill()

    with pytest.raises(TrainingFailed) as failed:
        pipeline.train(settings, snapshot, validation, settings.definition.dag_id, "manual__kill", overrides,
                       sink=kill_after_second_epoch)
    assert killed and failed.value.exit_code == -9 and failed.value.retryable
    assert _ours(docker_client, killed[0]) == []
    client = registry.get_client(settings)
    (experiment,) = [e for e in client.search_experiments() if e.name == settings.experiment_name]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"

    # The dead container's lease on the checkpoint directory stands until it expires (60 s after its last
    # renewal): a retry before then is refused, retryably, touching nothing; Airflow's retry delay
    # (minutes) lets it lapse. Here: one early retry, then wait for the expiry.
    with pytest.raises(TrainingFailed) as early:
        pipeline.train(settings, snapshot, validation, settings.definition.dag_id, "manual__kill", overrides,
                       sink=lambda _line: None)
    assert early.value.exit_code == 75 and "leased" in str(early.value)
    lease = json.loads((settings.home / "objects" / "checkpoints" / training_key(settings) / "lease.json").read_text())
    time.sleep(max(0.0, float(lease["expires_at"]) - time.time() + 1))

    output: list[str] = []
    training = pipeline.train(settings, snapshot, validation, settings.definition.dag_id, "manual__kill",
                              overrides, sink=output.append)
    assert any("resumed from" in line for line in output), "\n".join(output[-30:])
    assert training["status"] == "succeeded" and training["mlflow_run_id"] == run.info.run_id
    (after,) = client.search_runs([experiment.experiment_id])
    assert after.info.status == "FINISHED"


def training_key(settings) -> str:
    """The one run key under the home's checkpoints (this test trains one config on one snapshot)."""
    (key,) = [p.name for p in (settings.home / "objects" / "checkpoints").iterdir()]
    return key
