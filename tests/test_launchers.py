"""Launchers: the command each one runs, exit-code mapping, streaming, and no secrets in argv/specs."""

from __future__ import annotations

import sys

import pytest

from ctrain.errors import TrainingFailed
from ctrain.launchers import DockerLauncher, KubernetesLauncher, LocalLauncher, TrainingJob, stream_process

JOB = TrainingJob(
    config_path="/opt/airflow/training_image/configs/default.yaml",
    overrides={"data.dataset_uri": "file:///d/v1", "seed": "7"},
    env={"MLFLOW_RUN_ID": "abc", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    nproc_per_node=2,
    max_restarts=3,
)


def test_local_command_is_torchrun_with_overrides():
    cmd = LocalLauncher(python="/venv/bin/python").command(JOB)
    assert cmd[:4] == ["/venv/bin/python", "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in cmd and "--max-restarts=3" in cmd
    assert cmd[-8:] == ["-m", "trainer", "train", "--config", "/opt/airflow/training_image/configs/default.yaml",
                        "--set", "data.dataset_uri=file:///d/v1", "--set", "seed=7"][-8:]


def test_docker_command_passes_env_by_name_only():
    cmd = DockerLauncher("ctrain-trainer:1").command(JOB)
    assert cmd[:3] == ["docker", "run", "--rm"]
    assert "s3cr3t" not in " ".join(cmd)
    assert cmd[cmd.index("AWS_SECRET_ACCESS_KEY") - 1] == "-e"
    assert cmd[cmd.index("ctrain-trainer:1") + 1] == "torchrun"
    # The host path does not exist in the container: the image's copy of the same config is used.
    assert cmd[cmd.index("--config") + 1] == "/opt/trainer/configs/default.yaml"


def test_kubernetes_manifest_keeps_secrets_in_a_secret():
    pod = KubernetesLauncher("ctrain-trainer:1", gpus=1).pod_manifest(JOB, "train-x")
    container = pod["spec"]["containers"][0]
    names = {e["name"] for e in container["env"]}
    assert names == {"MLFLOW_RUN_ID"}
    assert container["envFrom"] == [{"secretRef": {"name": "ctrain-trainer-env"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["restartPolicy"] == "Never"
    command = container["command"]
    assert command[command.index("--config") + 1] == "/opt/trainer/configs/default.yaml"


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
