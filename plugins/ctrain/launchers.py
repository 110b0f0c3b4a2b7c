"""Launch the containerized training task: a local torchrun process, a Docker container, or a Kubernetes pod.

All three run the same command (``torchrun ... -m trainer train --config FILE --set k=v ...``) with the
same environment contract (see ``docs/contracts.md``); they differ only in where the processes live.
The local launcher is the embedded default and the one the demo and tests run; the Docker and
Kubernetes launchers turn the same :class:`TrainingJob` into a ``docker run`` command or a Pod manifest.

Exit codes follow the trainer's contract (``trainer.contract``): 0 success, 65 bad data/config, 70
divergence or bug (both terminal), 75 retryable (lost peer, storage timeout).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from ctrain.errors import ConfigError, TrainingFailed
from trainer.contract import EXIT_OK, describe_exit

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

# Where training_image/Dockerfile puts training_image/configs/ inside the image.
IMAGE_CONFIG_DIR = "/opt/trainer/configs"

# Env vars passed through to the training processes when set (secrets travel by env, never by argv,
# so they stay out of `ps`, task logs and MLflow params).
PASSTHROUGH_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "CTRAIN_S3_ENDPOINT_URL",
)


@dataclass(frozen=True)
class TrainingJob:
    """What to train: a trainer config file plus ``section.key=value`` overrides and the environment."""

    config_path: str
    overrides: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    nproc_per_node: int = 2
    max_restarts: int = 0

    def trainer_args(self) -> list[str]:
        args = ["-m", "trainer", "train", "--config", self.config_path]
        for key, value in sorted(self.overrides.items()):
            args += ["--set", f"{key}={value}"]
        return args

    def in_image(self, config_dir: str = IMAGE_CONFIG_DIR) -> TrainingJob:
        """This job as a container sees it: the config is the image's copy of the same file.

        The host path (e.g. ``/opt/airflow/training_image/configs/default.yaml``) does not exist in
        the training container; the image ships ``training_image/configs/`` at ``config_dir``.
        """
        return replace(self, config_path=str(PurePosixPath(config_dir) / PurePosixPath(self.config_path).name))

    def torchrun_args(self, python: str = sys.executable) -> list[str]:
        # Standalone rendezvous picks a free port on loopback, so parallel runs never collide.
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--max-restarts={self.max_restarts}",
            *self.trainer_args(),
        ]


class LocalLauncher:
    """Runs torchrun as a subprocess; its output streams line by line into ``sink`` (the task log)."""

    name = "local"

    def __init__(self, python: str = sys.executable, cwd: str | None = None):
        self.python = python
        self.cwd = cwd

    def command(self, job: TrainingJob) -> list[str]:
        return job.torchrun_args(self.python)

    def run(self, job: TrainingJob, sink: Callable[[str], None] | None = None) -> None:
        env = dict(job.env)
        # Avoid oversubscription: each rank gets its share of the cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.nproc_per_node)))
        stream_process(self.command(job), env, sink, cwd=self.cwd)


class DockerLauncher:
    """Runs the training image with ``docker run`` (the production profile's single-host launcher)."""

    name = "docker"

    def __init__(self, image: str, network: str | None = None, gpus: str | None = None, shm_size: str = "2g",
                 config_dir: str = IMAGE_CONFIG_DIR):
        self.image = image
        self.network = network
        self.gpus = gpus
        self.shm_size = shm_size
        self.config_dir = config_dir

    def command(self, job: TrainingJob) -> list[str]:
        cmd = ["docker", "run", "--rm", f"--shm-size={self.shm_size}"]
        if self.network:
            cmd += ["--network", self.network]
        if self.gpus:
            cmd += ["--gpus", self.gpus]
        # Names only: docker copies each value from this process's env, so no secret lands in argv.
        cmd += [arg for key in sorted(job.env) for arg in ("-e", key)]
        cmd += [self.image, "torchrun", "--standalone", f"--nproc-per-node={job.nproc_per_node}",
                f"--max-restarts={job.max_restarts}", *job.in_image(self.config_dir).trainer_args()]
        return cmd

    def run(self, job: TrainingJob, sink: Callable[[str], None] | None = None) -> None:
        stream_process(self.command(job), job.env, sink)


class KubernetesLauncher:
    """Builds a Pod manifest for the training image (run it with KubernetesPodOperator or kubectl)."""

    name = "kubernetes"

    def __init__(self, image: str, namespace: str = "ctrain", cpu: str = "2", memory: str = "8Gi",
                 gpus: int = 0, secret_name: str = "ctrain-trainer-env", config_dir: str = IMAGE_CONFIG_DIR):
        self.config_dir = config_dir
        self.image = image
        self.namespace = namespace
        self.cpu = cpu
        self.memory = memory
        self.gpus = gpus
        self.secret_name = secret_name

    def pod_manifest(self, job: TrainingJob, name: str) -> dict:
        limits: dict[str, str] = {"cpu": self.cpu, "memory": self.memory}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {"app": "ctrain-trainer"}},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "trainer",
                    "image": self.image,
                    "command": ["torchrun", "--standalone", f"--nproc-per-node={job.nproc_per_node}",
                                f"--max-restarts={job.max_restarts}",
                                *job.in_image(self.config_dir).trainer_args()],
                    # Non-secret settings inline; credentials come from a Secret, never from the spec.
                    "env": [{"name": k, "value": v} for k, v in sorted(job.env.items())
                            if not _looks_secret(k)],
                    "envFrom": [{"secretRef": {"name": self.secret_name}}],
                    "resources": {"requests": dict(limits), "limits": limits},
                    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                }],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
            },
        }


def _looks_secret(name: str) -> bool:
    return any(word in name.upper() for word in ("SECRET", "PASSWORD", "TOKEN", "KEY_ID"))


def stream_process(
    cmd: list[str], env: dict[str, str], sink: Callable[[str], None] | None, cwd: str | None = None
) -> None:
    """Run ``cmd`` with ``env`` added to this process's environment, streaming its output to ``sink``.

    Raises :class:`TrainingFailed` carrying the exit code, so the caller can tell retryable from terminal.
    """
    sink = sink or (lambda line: log.info("%s", line))
    sink("launching: " + shlex.join(cmd))
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None  # guaranteed by stdout=PIPE
    for line in proc.stdout:
        sink(line.rstrip("\n"))
    code = proc.wait()
    if code != EXIT_OK:
        raise TrainingFailed(code, f"trainer exited with code {code}: {describe_exit(code)}")


def get_launcher(kind: str, image: str = "ctrain-trainer:latest") -> LocalLauncher | DockerLauncher:
    """The launcher named by the ``CTRAIN_LAUNCHER`` setting."""
    if kind == "local":
        return LocalLauncher()
    if kind == "docker":
        return DockerLauncher(image)
    raise ConfigError(
        f"CTRAIN_LAUNCHER={kind!r} cannot run a job from a task directly; use 'local' or 'docker' "
        "(for 'kubernetes', the DAG uses KubernetesPodOperator with KubernetesLauncher.pod_manifest)."
    )
