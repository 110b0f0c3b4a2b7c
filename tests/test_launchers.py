"""Launchers: the command each one runs, exit-code mapping, streaming, and no secrets in argv/specs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ctrain.errors import ConfigError, TrainingFailed
from ctrain.launchers import (
    PASSTHROUGH_ENV,
    DockerLauncher,
    KubernetesLauncher,
    LocalLauncher,
    TrainingJob,
    _container_exit,
    get_launcher,
    local_paths,
    stream_process,
)
from ctrain.settings import Settings

JOB = TrainingJob(
    config_path="/opt/airflow/training_image/configs/default.yaml",
    overrides={"data.dataset_uri": "file:///d/v1", "seed": "7"},
    env={"MLFLOW_RUN_ID": "abc", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    nproc_per_node=2,
    max_restarts=3,
)
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_local_command_is_torchrun_with_overrides():
    cmd = LocalLauncher(python="/venv/bin/python").command(JOB)
    assert cmd[:4] == ["/venv/bin/python", "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in cmd and "--max-restarts=3" in cmd
    assert cmd[-8:] == ["-m", "trainer", "train", "--config", "/opt/airflow/training_image/configs/default.yaml",
                        "--set", "data.dataset_uri=file:///d/v1", "--set", "seed=7"][-8:]


def test_docker_spec_keeps_secrets_out_of_the_command(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("CTRAIN_S3_ENDPOINT_URL", "http://minio:9000")
    spec = DockerLauncher("ctrain-trainer:1", user="1000:1000").container_spec(JOB, "train-x")
    assert spec["image"] == "ctrain-trainer:1" and spec["name"] == "train-x"
    assert spec["command"][:2] == ["torchrun", "--standalone"]
    assert "s3cr3t" not in " ".join(spec["command"]) and "AKIAEXAMPLE" not in " ".join(spec["command"])
    # The contract travels by environment: the job's env and the PASSTHROUGH_ENV names set here.
    assert spec["environment"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert spec["environment"]["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE"
    assert spec["environment"]["CTRAIN_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert spec["environment"]["MLFLOW_RUN_ID"] == "abc"
    # An S3 endpoint needs a network; the host path of the config does not exist in the container.
    assert spec["network_mode"] == "host" and "hostname" not in spec
    assert spec["command"][spec["command"].index("--config") + 1] == "/opt/trainer/configs/default.yaml"
    assert spec["user"] == "1000:1000" and spec["shm_size"] == "2g" and "device_requests" not in spec


def test_docker_spec_for_local_uris_mounts_them_with_no_network(monkeypatch):
    for name in PASSTHROUGH_ENV:
        monkeypatch.delenv(name, raising=False)
    job = TrainingJob(config_path="debug.yaml",
                      overrides={"data.dataset_uri": "file:///srv/objects/datasets/v1",
                                 "output.uri": "file:///srv/objects/runs/k"},
                      env={"MLFLOW_TRACKING_URI": "sqlite:////srv/home/mlflow.db"})
    mounts = local_paths(["file:///srv/objects", "sqlite:////srv/home/mlflow.db", "/srv/home/mlartifacts"])
    assert mounts == ["/srv/home", "/srv/objects"]
    spec = DockerLauncher("img", mounts=mounts, gpus=2, shm_size="1g").container_spec(job, "n")
    assert spec["network_mode"] == "none"
    # torchrun --standalone must resolve the hostname to loopback when there is no network
    assert spec["hostname"] == "trainer" and spec["extra_hosts"] == {"trainer": "127.0.0.1"}
    assert spec["volumes"] == {p: {"bind": p, "mode": "rw"} for p in mounts}
    assert spec["device_requests"][0]["Count"] == 2 and spec["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert spec["shm_size"] == "1g"


def test_local_paths_skips_remote_uris_and_collapses_nested_ones():
    assert local_paths(["s3://b/x", "http://mlflow:5000", None, "", "file:///a/b", "file:///a", "/c/d"]) == \
        ["/a", "/c/d"]


def test_container_exit_statuses_map_signals_like_the_local_launcher():
    assert _container_exit(0) == 0 and _container_exit(75) == 75
    assert _container_exit(137) == -9 and _container_exit(143) == -15


@pytest.mark.parametrize(("kind", "cls"), [("local", LocalLauncher), ("docker", DockerLauncher),
                                           ("kubernetes", KubernetesLauncher)])
def test_get_launcher_follows_the_setting(tmp_path, kind, cls):
    settings = Settings(home=tmp_path, launcher=kind, training_image="img:2", docker_network="ctrain",
                        pod_runtime="podman", k8s_node_selector={"pool": "gpu"})
    launcher = get_launcher(settings)
    assert isinstance(launcher, cls) and launcher.name == kind
    if kind == "docker":
        assert launcher.image == "img:2" and launcher.network == "ctrain"
        assert launcher.mounts == [str(tmp_path)]  # objects, mlflow.db, mlartifacts: all under the home
    if kind == "kubernetes":
        assert launcher.runtime == "podman" and launcher.node_selector == {"pool": "gpu"}


def test_get_launcher_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(ConfigError, match="CTRAIN_LAUNCHER='ssh'"):
        get_launcher(Settings(home=tmp_path, launcher="ssh"))


def test_kubernetes_manifest_keeps_secrets_in_a_secret(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    launcher = KubernetesLauncher("ctrain-trainer:1", gpus=1, node_selector={"pool": "gpu"},
                                  tolerations=[TOLERATION])
    pod = launcher.pod_manifest(JOB, "train-x")
    container = pod["spec"]["containers"][0]
    names = {e["name"] for e in container["env"]}
    assert "MLFLOW_RUN_ID" in names and not names & {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"}
    assert "s3cr3t" not in json.dumps(pod) and "AKIAEXAMPLE" not in json.dumps(pod)
    assert launcher.secret_env(JOB) == {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}
    assert container["envFrom"] == [{"secretRef": {"name": "ctrain-trainer-env"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"} and pod["spec"]["tolerations"] == [TOLERATION]
    command = container["command"]
    assert command[command.index("--config") + 1] == "/opt/trainer/configs/default.yaml"


def test_multinode_manifests_meet_through_c10d_on_pod_zero():
    service, job = KubernetesLauncher("ctrain-trainer:1").multinode_manifests(JOB, "train-x", nodes=3)
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "train-x"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    command = pod["containers"][0]["command"]
    assert "--nnodes=3" in command and "--rdzv-backend=c10d" in command
    assert "--rdzv-endpoint=train-x-0.train-x:29400" in command and "--standalone" not in command


def _validate_manifests(tmp_path: Path, manifests: list[dict]) -> None:
    """kubernetes-validate --strict (requirements.lock; offline schemas): unknown or mistyped fields fail."""
    validator = shutil.which("kubernetes-validate", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if validator is None:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed (requirements.lock; make install)")
        pytest.skip("kubernetes-validate is not installed (make install puts it in .venv)")
    files = []
    for i, manifest in enumerate(manifests):
        files.append(tmp_path / f"m{i}.yaml")
        files[-1].write_text(yaml.safe_dump(manifest))
    out = subprocess.run([validator, "--strict", *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_manifest_validates_against_the_kubernetes_schema(tmp_path):
    launcher = KubernetesLauncher("ctrain-trainer:1", gpus=1, node_selector={"pool": "gpu"},
                                  tolerations=[TOLERATION], mounts=["/srv/objects"], run_as=(1000, 1000))
    _validate_manifests(tmp_path, [launcher.pod_manifest(JOB, "train-x"),
                                   *launcher.multinode_manifests(JOB, "train-y", nodes=2)])


def test_stream_process_streams_lines_and_succeeds():
    lines: list[str] = []
    stream_process([sys.executable, "-c", "print('a'); print('b')"], {}, lines.append)
    assert lines[1:] == ["a", "b"]


@pytest.mark.parametrize(("code", "retryable"), [(65, False), (70, False), (75, True), (1, True)])
def test_exit_codes_map_to_retryable_or_terminal(code, retryable):
    with pytest.raises(TrainingFailed) as info:
        stream_process([sys.executable, "-c", f"import sys; print('dying'); sys.exit({code})"], {}, lambda _l: None)
    assert info.value.exit_code == code
    assert info.value.retryable is retryable
    assert f"code {code}" in str(info.value)


FAKE_KUBECTL = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
with open(sys.argv[0] + ".calls", "a") as fh:
    fh.write(json.dumps({"args": args, "stdin": sys.stdin.read() if "apply" in args else None}) + "\\n")
if "logs" in args:
    print("epoch 1 eval: val_loss 0.1")
if "get" in args:
    print(75, end="")
"""


def test_kubectl_runtime_applies_follows_reads_the_exit_code_and_deletes(tmp_path, monkeypatch):
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    with pytest.raises(TrainingFailed) as failed:
        KubernetesLauncher("ctrain-trainer:1", namespace="ml").run(JOB, lines.append, name="train-x")
    assert failed.value.exit_code == 75 and failed.value.retryable
    assert "epoch 1 eval: val_loss 0.1" in lines
    calls = [json.loads(line) for line in (tmp_path / "kubectl.calls").read_text().splitlines()]
    verbs = [next(a for a in c["args"] if not a.startswith("-") and a != "ml") for c in calls]
    assert verbs == ["apply", "wait", "logs", "wait", "get", "delete"]
    applied = json.loads(calls[0]["stdin"])
    assert applied["kind"] == "Pod" and applied["metadata"] == {
        "name": "train-x", "namespace": "ml", "labels": {"app": "ctrain-trainer", "ctrain/job": "train-x"}}
    assert "s3cr3t" not in calls[0]["stdin"]  # the credential is the cluster's Secret, not the manifest's


# Answers like kubectl for a 3-pod Indexed Job: `get job -o json` shows no terminal condition on the first
# poll, then the scenario's; `get pods -o json` lists the pods' container states; `logs --prefix` prints one
# prefixed line per pod (after `logs_sleep` seconds). The scenario is the JSON file beside the script.
FAKE_KUBECTL_JOB = """#!/usr/bin/env python3
import json, os, sys, time
args = sys.argv[1:]
here = sys.argv[0]
with open(here + ".calls", "a") as fh:
    fh.write(json.dumps({"args": args, "stdin": sys.stdin.read() if "apply" in args else None}) + "\\n")
scenario = json.load(open(here + ".scenario"))
if "logs" in args:
    time.sleep(scenario.get("logs_sleep", 0))
    for i in range(3):
        print(f"[pod/train-x-{i}-abcde/trainer] rank {i}: epoch 1 eval: val_loss 0.1", flush=True)
elif "get" in args and any(a.startswith("job/") for a in args):
    polls = here + ".polls"
    seen = os.path.exists(polls)
    open(polls, "a").close()
    conditions = [{"type": scenario["outcome"], "status": "True"}] if seen else []
    print(json.dumps({"kind": "Job", "status": {"active": 0 if seen else 3, "conditions": conditions}}))
elif "get" in args and "pods" in args:
    items = [{"metadata": {"name": f"train-x-{i}-abcde"},
              "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
                  "exitCode": code, "finishedAt": at}}}]}} for i, (code, at) in enumerate(scenario["pods"])]
    print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
"""


def _fake_kubectl_job(tmp_path: Path, monkeypatch, **scenario) -> Path:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL_JOB)
    kubectl.chmod(0o755)
    (tmp_path / "kubectl.scenario").write_text(json.dumps(scenario))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "kubectl.calls"


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _verbs(calls: list[dict]) -> list[str]:
    return [next(a for a in c["args"] if not a.startswith("-") and a != "ml") for c in calls]


def test_kubectl_job_for_several_nodes_maps_the_first_failed_pods_exit_code(tmp_path, monkeypatch):
    # pod 1 fails with bad data first; pod 0 then loses its peer (75) and pod 2 is killed (137)
    calls_file = _fake_kubectl_job(tmp_path, monkeypatch, outcome="Failed", pods=[
        [75, "2026-12-01T10:00:05Z"], [65, "2026-12-01T10:00:01Z"], [137, "2026-12-01T10:00:09Z"]])
    lines: list[str] = []
    launcher = KubernetesLauncher("ctrain-trainer:1", namespace="ml", nnodes=3, poll_s=0.01)
    with pytest.raises(TrainingFailed) as failed:
        launcher.run(JOB, lines.append, name="train-x")
    assert failed.value.exit_code == 65 and not failed.value.retryable
    assert [line for line in lines if "epoch 1" in line] == [
        f"[pod/train-x-{i}-abcde/trainer] rank {i}: epoch 1 eval: val_loss 0.1" for i in range(3)]
    calls = _calls(calls_file)
    assert _verbs(calls) == ["apply", "wait", "logs", "get", "get", "get", "delete"]
    assert "-l" in calls[2]["args"] and "ctrain/job=train-x" in calls[2]["args"]
    assert "--max-log-requests=3" in calls[2]["args"] and "--prefix" in calls[2]["args"]
    assert calls[-1]["args"][3:5] == ["job/train-x", "service/train-x"]
    applied = json.loads(calls[0]["stdin"])
    assert [m["kind"] for m in applied["items"]] == ["Service", "Job"]
    assert applied["items"][1]["spec"]["completions"] == 3
    assert "s3cr3t" not in calls[0]["stdin"]  # the credential is the cluster's Secret, not the manifest's
    _validate_manifests(tmp_path, applied["items"])


def test_kubectl_job_that_completes_succeeds_and_is_deleted(tmp_path, monkeypatch):
    calls_file = _fake_kubectl_job(tmp_path, monkeypatch, outcome="Complete", pods=[])
    KubernetesLauncher("ctrain-trainer:1", namespace="ml", nnodes=3, poll_s=0.01).run(
        JOB, lambda _line: None, name="train-x")
    assert _verbs(_calls(calls_file)) == ["apply", "wait", "logs", "get", "get", "delete"]


def test_sigterm_during_a_multinode_run_deletes_the_job_and_the_service(tmp_path, monkeypatch):
    calls_file = _fake_kubectl_job(tmp_path, monkeypatch, outcome="Complete", pods=[], logs_sleep=120)
    script = ("import sys; from ctrain.launchers import KubernetesLauncher, TrainingJob; "
              "KubernetesLauncher('ctrain-trainer:1', namespace='ml', nnodes=2, poll_s=0.01).run("
              "TrainingJob(config_path='debug.yaml'), print, name='train-x')")
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (calls_file.exists() and "logs" in _verbs(_calls(calls_file))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "SIGTERM" in out
    calls = _calls(calls_file)
    assert _verbs(calls)[-1] == "delete" and calls[-1]["args"][3:5] == ["job/train-x", "service/train-x"]


def test_only_kubectl_runs_a_multinode_job(tmp_path):
    with pytest.raises(ConfigError, match=r"CTRAIN_TRAINING_NNODES=2 \(or training.nnodes\) needs CTRAIN_POD_RUNTIME=kubectl"):
        get_launcher(Settings(home=tmp_path, launcher="kubernetes", pod_runtime="podman", training_nnodes=2))
    assert get_launcher(Settings(home=tmp_path, launcher="kubernetes", training_nnodes=4)).nnodes == 4
    with pytest.raises(ConfigError, match=r"CTRAIN_TRAINING_NNODES=2 \(or the definition's training.nnodes\) "
                       "needs the kubernetes launcher"):
        get_launcher(Settings(home=tmp_path, launcher="docker", training_nnodes=2))


def test_the_definitions_nnodes_wins_over_the_setting(tmp_path):
    from support import pipeline_settings

    settings = pipeline_settings(tmp_path, training__nnodes=3, training__launcher="kubernetes")
    settings = settings.model_copy(update={"training_nnodes": 5})
    assert get_launcher(settings).nnodes == 3
    assert get_launcher(pipeline_settings(tmp_path, training__launcher="kubernetes")).nnodes == 1
