"""Launch the containerized training task: a local torchrun process, a Docker container, or a Kubernetes pod.

All three implement :class:`Launcher` (``run(job, sink)``), are chosen by the ``CTRAIN_LAUNCHER`` setting
(:func:`get_launcher`), and run the same command (``torchrun ... -m trainer train --config FILE --set k=v``)
with the same environment contract (``docs/contracts.md``): the job's env (tracking URI, run id) plus the
:data:`PASSTHROUGH_ENV` names set in this process (S3 endpoint and credentials), always by environment,
never in argv. They differ only in where the processes live:

- ``local``: torchrun as a subprocess (the embedded default; the demo and most tests).
- ``docker``: the training image through the Docker SDK (the Airflow image carries no docker CLI); local
  (``file://``, SQLite) paths are bind-mounted at the same path inside; the network is ``none`` when
  everything is local, else ``host`` or ``CTRAIN_DOCKER_NETWORK``.
- ``kubernetes``: a Pod manifest (or, for several nodes, an Indexed Job + headless Service with torchrun's
  c10d rendezvous) run by ``kubectl`` on a cluster or by ``podman kube play`` on one host
  (``CTRAIN_POD_RUNTIME``); credentials come from a Secret, never from the manifest.

Exit codes follow the trainer's contract (``trainer.contract``): 0 success, 65 bad data/config, 70 divergence or bug (both
terminal), 75 retryable (lost peer, storage timeout); a process or container killed by a signal reports
``-signal``. Whatever stops the launcher (SIGTERM from Airflow, SIGINT, or SIGKILL) stops its container.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ctrain.errors import ConfigError, TrainingFailed
from trainer.contract import EXIT_OK, EXIT_RETRYABLE, describe_exit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

# Where training_image/Dockerfile puts training_image/configs/ inside the image.
IMAGE_CONFIG_DIR = "/opt/trainer/configs"

# Env vars passed through to the training processes when set (secrets travel by env, never by argv,
# so they stay out of `ps`, task logs, `docker inspect`'s command and MLflow params).
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

# Label on every container the docker launcher starts (scripts/images.sh stop removes what is left).
CONTAINER_LABEL = "org.ctrain.launcher"
# The rendezvous port of multi-node torchrun (c10d) behind the headless Service.
RDZV_PORT = 29400


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

    def container_command(self, config_dir: str = IMAGE_CONFIG_DIR) -> list[str]:
        """The single-node command inside the training image."""
        return ["torchrun", "--standalone", f"--nproc-per-node={self.nproc_per_node}",
                f"--max-restarts={self.max_restarts}", *self.in_image(config_dir).trainer_args()]

    def environment(self) -> dict[str, str]:
        """The environment contract: :data:`PASSTHROUGH_ENV` names set here, then the job's own env."""
        return {**{k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}, **self.env}


class Launcher(Protocol):
    """Runs a :class:`TrainingJob` to completion, streaming its output lines into ``sink`` (the task log).

    Returns on exit code 0; raises :class:`TrainingFailed` with the exit code otherwise."""

    name: str

    def run(self, job: TrainingJob, sink: Callable[[str], None] | None = None) -> None: ...


def _container_exit(code: int) -> int:
    """A container's status (128 + N when its main process died of signal N) as the local launcher reports it."""
    return -(code - 128) if 128 < code < 128 + 65 else code


def _fail(code: int) -> TrainingFailed:
    return TrainingFailed(code, f"trainer exited with code {code}: {describe_exit(code)}")


def local_paths(uris: Iterable[str | None]) -> list[str]:
    """Host directories behind local URIs (``file://``, ``sqlite:///``, plain paths); remote ones are skipped.

    A container or pod mounts each at the same path, so the URIs mean the same inside. Nested paths
    collapse into their outermost directory."""
    paths: set[str] = set()
    for uri in uris:
        if not uri:
            continue
        parts = urlsplit(uri)
        if parts.scheme == "file":
            path = Path(parts.path)
        elif parts.scheme == "sqlite":
            path = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:////") else None
        elif not parts.scheme:
            path = Path(uri)
        else:
            path = None
        if path is not None and path.is_absolute():
            paths.add(str(path))
    ordered = sorted(paths)
    return [p for p in ordered if not any(p.startswith(q.rstrip("/") + "/") for q in ordered if q != p)]


def _settings_paths(settings: Settings) -> list[str]:
    return local_paths([settings.resolved_object_root, settings.resolved_tracking_uri,
                        settings.resolved_artifact_root])


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
    """Runs the training image through the Docker SDK (the production profile's single-host launcher).

    ``network``: ``None`` picks ``none`` when ``mounts`` cover every URI the job uses (all local), else
    ``host``; or a named network (compose's) to reach MLflow and S3 by service name. ``mounts`` are host
    directories bind-mounted read-write at the same path. ``gpus``: 0 none, -1 all, N that many.
    ``user``: ``uid:gid`` the container runs as (default: this process's, so the files it writes to a
    mounted directory belong to the Airflow worker).
    """

    name = "docker"

    def __init__(self, image: str, network: str | None = None, gpus: int = 0, shm_size: str = "2g",
                 config_dir: str = IMAGE_CONFIG_DIR, mounts: Iterable[str] = (), user: str | None = None,
                 stop_timeout_s: int = 20, client_factory: Callable[[], Any] | None = None):
        self.image = image
        self.network = network
        self.gpus = gpus
        self.shm_size = shm_size
        self.config_dir = config_dir
        self.mounts = list(mounts)
        self.user = user if user is not None else f"{os.getuid()}:{os.getgid()}"
        self.stop_timeout_s = stop_timeout_s
        self._client_factory = client_factory

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerLauncher:
        remote = not _all_local(settings)
        return cls(settings.training_image, network=settings.docker_network or ("host" if remote else None),
                   gpus=settings.training_gpus, shm_size=settings.training_shm_size,
                   mounts=_settings_paths(settings))

    def _network(self, job: TrainingJob) -> str:
        if self.network:
            return self.network
        uris = [*job.overrides.values(), job.env.get("MLFLOW_TRACKING_URI", "")]
        remote = [u for u in uris if "://" in u and urlsplit(u).scheme not in ("file", "sqlite")]
        return "host" if remote or job.environment().get("CTRAIN_S3_ENDPOINT_URL") else "none"

    def container_spec(self, job: TrainingJob, name: str) -> dict[str, Any]:
        """Keyword arguments of ``docker.containers.create`` for ``job`` (no secret in the command)."""
        from docker.types import DeviceRequest

        env = {**job.environment(), "PYTHONUNBUFFERED": "1", "HOME": "/tmp",
               "OMP_NUM_THREADS": job.env.get("OMP_NUM_THREADS")
               or str(max(1, (os.cpu_count() or 1) // job.nproc_per_node))}
        spec: dict[str, Any] = {
            "image": self.image,
            "command": job.container_command(self.config_dir),
            "name": name,
            "environment": env,
            "user": self.user,
            "shm_size": self.shm_size,
            "labels": {CONTAINER_LABEL: "docker"},
            "volumes": {path: {"bind": path, "mode": "rw"} for path in self.mounts},
            "network_mode": self._network(job),
        }
        if spec["network_mode"] == "none":
            # torchrun --standalone resolves the container's hostname: with no network it must map to
            # loopback, or the rendezvous waits 300 s and fails.
            spec |= {"hostname": "trainer", "extra_hosts": {"trainer": "127.0.0.1"}}
        if self.gpus:
            spec["device_requests"] = [DeviceRequest(count=self.gpus, capabilities=[["gpu"]])]
        return spec

    def run(self, job: TrainingJob, sink: Callable[[str], None] | None = None, name: str | None = None) -> None:
        import docker

        sink = sink or (lambda line: log.info("%s", line))
        client = self._client_factory() if self._client_factory else docker.from_env()
        name = name or f"ctrain-train-{uuid.uuid4().hex[:12]}"
        for path in self.mounts:
            Path(path).mkdir(parents=True, exist_ok=True)
        spec = self.container_spec(job, name)
        sink(f"launching container {name} ({self.image}, network {spec['network_mode']}): "
             + shlex.join(spec["command"]))
        container = client.containers.create(**spec)
        reaper = _start_reaper(container.id)  # removes the container even if this process is SIGKILLed
        try:
            with _sigterm_raises():
                container.start()
                _stream_lines(container.logs(stream=True, follow=True), sink)
                code = int(container.wait()["StatusCode"])
        finally:
            try:
                container.stop(timeout=self.stop_timeout_s)  # SIGTERM to torchrun, then SIGKILL
            except docker.errors.NotFound:
                pass
            finally:
                with suppress(docker.errors.NotFound):
                    container.remove(force=True)
                reaper.stdin.close()  # type: ignore[union-attr]
        if code != EXIT_OK:
            raise _fail(_container_exit(code))


class _Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt: not an Exception, so nothing swallows it
    """SIGTERM arrived while a container ran."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration (after Airflow's own handler, which only calls
    ``on_kill``), so the launcher's cleanup runs. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise _Terminated("SIGTERM: stopping the training container")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# A separate process (own session, so Airflow's process-group kill spares it) that removes the container
# when its stdin closes, i.e. when the launcher exits for any reason, SIGKILL included.
_REAPER = """
import sys, docker
sys.stdin.read()
try:
    docker.from_env().containers.get(sys.argv[1]).remove(force=True)
except docker.errors.NotFound:
    pass
"""


def _start_reaper(container_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _REAPER, container_id], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stream_lines(chunks: Iterable[bytes], sink: Callable[[str], None]) -> None:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            sink(line.decode(errors="replace").rstrip("\r"))
    if buffer:
        sink(buffer.decode(errors="replace"))


def _all_local(settings: Settings) -> bool:
    """Everything the trainer touches is local (file://, SQLite) and no S3 endpoint is set."""
    uris = [settings.resolved_object_root, settings.resolved_tracking_uri, settings.resolved_artifact_root]
    return not settings.s3_endpoint_url and all(
        "://" not in u or urlsplit(u).scheme in ("file", "sqlite") for u in uris)


class KubernetesLauncher:
    """Pod (single node) or Indexed Job + headless Service (several nodes) for the training image.

    Non-secret env is inline; every credential (:data:`PASSTHROUGH_ENV` names that look secret) comes from
    the Secret ``secret_name`` through ``envFrom``. ``mounts`` become hostPath volumes at the same path (a
    single host, or a node-local object root); on a cluster the object root is ``s3://`` and needs none.
    ``run_as`` (uid, gid) sets the pod's securityContext (the owner of the hostPath directories).
    ``runtime`` runs the Pod: ``kubectl`` (a cluster) or ``podman`` (``podman kube play`` on this host).
    """

    name = "kubernetes"

    def __init__(self, image: str, namespace: str = "ctrain", cpu: str = "2", memory: str = "8Gi",
                 gpus: int = 0, secret_name: str = "ctrain-trainer-env", config_dir: str = IMAGE_CONFIG_DIR,
                 node_selector: dict[str, str] | None = None, tolerations: list[dict[str, Any]] | None = None,
                 mounts: Iterable[str] = (), run_as: tuple[int, int] | None = None, runtime: str = "kubectl",
                 network: str = "none", timeout_s: float = 4 * 3600.0, nnodes: int = 1,
                 poll_s: float = 5.0):
        self.config_dir = config_dir
        self.image = image
        self.namespace = namespace
        self.cpu = cpu
        self.memory = memory
        self.gpus = gpus
        self.secret_name = secret_name
        self.node_selector = dict(node_selector or {})
        self.tolerations = list(tolerations or [])
        self.mounts = list(mounts)
        self.run_as = run_as
        if runtime not in POD_RUNTIMES:
            raise ConfigError(f"CTRAIN_POD_RUNTIME={runtime!r}: expected one of {', '.join(POD_RUNTIMES)}")
        if nnodes < 1:
            raise ConfigError(f"CTRAIN_TRAINING_NNODES={nnodes}: expected 1 or more nodes")
        if nnodes > 1 and runtime != "kubectl":
            raise ConfigError(f"CTRAIN_TRAINING_NNODES={nnodes} (or training.nnodes) needs CTRAIN_POD_RUNTIME=kubectl: multi-node "
                              f"training runs as a Kubernetes Indexed Job, which {runtime} cannot run; set "
                              "CTRAIN_TRAINING_NNODES=1 or train on a cluster")
        self.runtime = runtime
        self.network = network
        self.timeout_s = timeout_s
        self.nnodes = nnodes
        self.poll_s = poll_s

    @classmethod
    def from_settings(cls, settings: Settings) -> KubernetesLauncher:
        return cls(settings.training_image, namespace=settings.k8s_namespace, cpu=settings.training_cpu,
                   memory=settings.training_memory, gpus=max(settings.training_gpus, 0),
                   secret_name=settings.training_secret, node_selector=settings.k8s_node_selector,
                   tolerations=settings.k8s_tolerations, mounts=(mounts := _settings_paths(settings)),
                   # hostPath directories belong to this process's user: the trainer runs as it
                   run_as=(os.getuid(), os.getgid()) if mounts else None,
                   runtime=settings.pod_runtime, network="none" if _all_local(settings) else "host",
                   timeout_s=settings.max_train_wall_clock_s + 600, nnodes=settings.resolved_nnodes)

    # ---- manifests ---------------------------------------------------------------------------------
    def _container(self, job: TrainingJob, command: list[str]) -> dict[str, Any]:
        limits: dict[str, str] = {"cpu": self.cpu, "memory": self.memory}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        env = {**job.environment(), "PYTHONUNBUFFERED": "1", "HOME": "/tmp"}
        return {
            "name": "trainer",
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            # Non-secret settings inline; credentials come from the Secret, never from the spec.
            "env": [{"name": k, "value": v} for k, v in sorted(env.items()) if not _looks_secret(k)],
            "envFrom": [{"secretRef": {"name": self.secret_name}}],
            "resources": {"requests": dict(limits), "limits": limits},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                             *({"name": f"local-{i}", "mountPath": p} for i, p in enumerate(self.mounts))],
        }

    def _pod_spec(self, container: dict[str, Any]) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "containers": [container],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}},
                        *({"name": f"local-{i}", "hostPath": {"path": p, "type": "DirectoryOrCreate"}}
                          for i, p in enumerate(self.mounts))],
        }
        if self.run_as is not None:
            spec["securityContext"] = {"runAsUser": self.run_as[0], "runAsGroup": self.run_as[1]}
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            spec["tolerations"] = list(self.tolerations)
        return spec

    def _metadata(self, name: str) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": {"app": "ctrain-trainer", "ctrain/job": name}}

    def pod_manifest(self, job: TrainingJob, name: str) -> dict[str, Any]:
        """One Pod, torchrun --standalone with ``job.nproc_per_node`` processes."""
        container = self._container(job, job.container_command(self.config_dir))
        return {"apiVersion": "v1", "kind": "Pod", "metadata": self._metadata(name),
                "spec": self._pod_spec(container)}

    def multinode_manifests(self, job: TrainingJob, name: str, nodes: int) -> list[dict[str, Any]]:
        """A headless Service and an Indexed Job of ``nodes`` pods, one torchrun each, meeting through
        c10d rendezvous on pod 0 (``<name>-0.<name>``, stable DNS from the Job's subdomain)."""
        if nodes < 2:
            raise ConfigError(f"multi-node training needs at least 2 nodes, got {nodes}; use pod_manifest")
        command = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={job.nproc_per_node}",
                   f"--max-restarts={job.max_restarts}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint={name}-0.{name}:{RDZV_PORT}", f"--rdzv-id={name}",
                   *job.in_image(self.config_dir).trainer_args()]
        container = self._container(job, command)
        container["ports"] = [{"name": "rdzv", "containerPort": RDZV_PORT}]
        pod_spec = self._pod_spec(container) | {"subdomain": name}
        service = {"apiVersion": "v1", "kind": "Service", "metadata": self._metadata(name),
                   "spec": {"clusterIP": "None", "selector": {"ctrain/job": name},
                            "publishNotReadyAddresses": True,
                            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]}}
        job_manifest = {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": self._metadata(name),
            "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                     "backoffLimit": 0,
                     "template": {"metadata": {"labels": {"app": "ctrain-trainer", "ctrain/job": name}},
                                  "spec": pod_spec}},
        }
        return [service, job_manifest]

    def secret_env(self, job: TrainingJob) -> dict[str, str]:
        """The credentials the Secret must hold for ``job`` (what ``envFrom`` brings into the pod)."""
        return {k: v for k, v in job.environment().items() if _looks_secret(k)}

    # ---- running ----------------------------------------------------------------------------------
    def run(self, job: TrainingJob, sink: Callable[[str], None] | None = None, name: str | None = None) -> None:
        sink = sink or (lambda line: log.info("%s", line))
        name = name or f"ctrain-train-{uuid.uuid4().hex[:12]}"
        for path in self.mounts:
            Path(path).mkdir(parents=True, exist_ok=True)
        if self.nnodes > 1:
            manifests = self.multinode_manifests(job, name, self.nnodes)
            sink(f"launching job {name} of {self.nnodes} pods ({self.image}, via kubectl): "
                 + shlex.join(manifests[1]["spec"]["template"]["spec"]["containers"][0]["command"]))
            code = _run_kubectl_job(self, manifests, sink)
        else:
            manifest = self.pod_manifest(job, name)
            sink(f"launching pod {name} ({self.image}, via {self.runtime}): "
                 + shlex.join(manifest["spec"]["containers"][0]["command"]))
            code = POD_RUNTIMES[self.runtime](self, manifest, job, sink)
        if code != EXIT_OK:
            raise _fail(_container_exit(code))


def _run_kubectl(launcher: KubernetesLauncher, pod: dict[str, Any], job: TrainingJob,
                 sink: Callable[[str], None]) -> int:
    """kubectl against the current context: apply, follow the logs, read the exit code, delete.
    The Secret ``launcher.secret_name`` is the cluster operator's (``docs/operations.md``)."""
    name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
    kubectl = ["kubectl", "--namespace", ns]
    subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(pod), text=True, check=True,
                   capture_output=True)
    try:
        with _sigterm_raises():
            subprocess.run([*kubectl, "wait", "--for=jsonpath={.status.phase}=Running", f"pod/{name}",
                            "--timeout=600s"], check=False, capture_output=True)
            _stream_command([*kubectl, "logs", "--follow", f"pod/{name}"], sink)
            subprocess.run([*kubectl, "wait", "--for=jsonpath={.status.phase}", f"pod/{name}",
                            f"--timeout={int(launcher.timeout_s)}s"], check=False, capture_output=True)
            out = subprocess.run([*kubectl, "get", f"pod/{name}", "-o",
                                  "jsonpath={.status.containerStatuses[0].state.terminated.exitCode}"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        return int(out) if out else 1
    finally:
        subprocess.run([*kubectl, "delete", f"pod/{name}", "--wait=false", "--ignore-not-found"],
                       check=False, capture_output=True)


def _run_kubectl_job(launcher: KubernetesLauncher, manifests: list[dict[str, Any]],
                     sink: Callable[[str], None]) -> int:
    """The multi-node run: apply the headless Service and the Indexed Job, follow every pod's log, wait until
    the Job completes or fails, and return 0 or the failed pod's container exit code. Job and Service are
    deleted on every way out (SIGTERM included); the Job's pods go with it (background cascade)."""
    service, job = manifests
    name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
    kubectl = ["kubectl", "--namespace", ns]
    selector = f"ctrain/job={name}"
    nodes = job["spec"]["completions"]
    try:
        with _sigterm_raises():
            subprocess.run([*kubectl, "apply", "-f", "-"], check=True, capture_output=True, text=True,
                           input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [service, job]}))
            subprocess.run([*kubectl, "wait", "--for=jsonpath={.status.phase}=Running", "pod", "-l", selector,
                            "--timeout=600s"], check=False, capture_output=True)
            # one stream for all pods, each line prefixed by its pod (kubectl allows 5 streams by default)
            _stream_command([*kubectl, "logs", "--follow", "--prefix", "-l", selector,
                             f"--max-log-requests={nodes}"], sink)
            condition = _job_outcome(kubectl, name, launcher.timeout_s, launcher.poll_s)
            if condition == "Complete":
                return EXIT_OK
            code = _failed_pod_exit(kubectl, selector)
            sink(f"job {name} {condition.lower()}: exit code {code}")
            return code
    finally:
        subprocess.run([*kubectl, "delete", f"job/{name}", f"service/{name}", "--ignore-not-found",
                        "--wait=false", "--cascade=background"], check=False, capture_output=True)


def _job_outcome(kubectl: list[str], name: str, timeout_s: float, poll_s: float) -> str:
    """``Complete`` or ``Failed``: the Job's terminal condition (``kubectl wait`` waits for one condition
    only, and a failed Job never completes), or ``timed out`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run([*kubectl, "get", f"job/{name}", "-o", "json"], capture_output=True, text=True)
        if out.returncode == 0:
            for condition in json.loads(out.stdout).get("status", {}).get("conditions") or []:
                if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
                    return condition["type"]
        if time.monotonic() >= deadline:
            return "timed out"
        time.sleep(poll_s)


def _failed_pod_exit(kubectl: list[str], selector: str) -> int:
    """The exit code of the pod that failed first (the others then stop as lost peers or are killed by the
    Job controller); 1 (retryable) when no container terminated with one."""
    out = subprocess.run([*kubectl, "get", "pods", "-l", selector, "-o", "json"], capture_output=True, text=True)
    failures = []
    for pod in json.loads(out.stdout).get("items", []) if out.returncode == 0 else []:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            terminated = status.get("state", {}).get("terminated") or {}
            if terminated.get("exitCode"):
                failures.append((terminated.get("finishedAt") or "", int(terminated["exitCode"])))
    return min(failures)[1] if failures else 1


def _run_podman(launcher: KubernetesLauncher, pod: dict[str, Any], job: TrainingJob,
                sink: Callable[[str], None]) -> int:
    """``podman kube play`` on this host (storage and engine settings from CONTAINERS_CONF /
    CONTAINERS_STORAGE_CONF, as ``scripts/images.sh env`` prints). The Secret is a podman secret made
    from this process's credentials, replaced for each run and removed after it."""
    import yaml

    name = pod["metadata"]["name"]
    container = f"{name}-trainer"
    secret = {k: base64.b64encode(v.encode()).decode() for k, v in launcher.secret_env(job).items()}
    subprocess.run(["podman", "secret", "rm", launcher.secret_name], check=False, capture_output=True)
    subprocess.run(["podman", "secret", "create", launcher.secret_name, "-"], input=json.dumps(secret),
                   text=True, check=True, capture_output=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{name}-", delete=False) as fh:
        yaml.safe_dump(pod, fh, sort_keys=False)
    try:
        with _sigterm_raises():
            play = subprocess.run(["podman", "kube", "play", f"--network={launcher.network}", fh.name],
                                  capture_output=True, text=True)
            if play.returncode != 0:
                raise TrainingFailed(EXIT_RETRYABLE, f"podman kube play failed: {play.stderr.strip()}")
            _stream_command(["podman", "logs", "--follow", container], sink)
            out = subprocess.run(["podman", "wait", container], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["podman", "kube", "down", fh.name], check=False, capture_output=True)
        subprocess.run(["podman", "secret", "rm", launcher.secret_name], check=False, capture_output=True)
        os.unlink(fh.name)


POD_RUNTIMES: dict[str, Callable[[KubernetesLauncher, dict[str, Any], TrainingJob, Callable[[str], None]], int]] = {
    "kubectl": _run_kubectl,
    "podman": _run_podman,
}


def _stream_command(cmd: list[str], sink: Callable[[str], None]) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None  # guaranteed by stdout=PIPE
    try:
        for line in proc.stdout:
            sink(line.rstrip("\n"))
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
        raise _fail(code)


def get_launcher(settings: Settings) -> Launcher:
    """The launcher the settings name (``CTRAIN_LAUNCHER``, unless the pipeline definition names one)."""
    kind = settings.resolved_launcher
    if settings.resolved_nnodes > 1 and kind != "kubernetes":
        raise ConfigError(f"CTRAIN_TRAINING_NNODES={settings.resolved_nnodes} (or the definition's "
                          "training.nnodes) needs the kubernetes launcher (CTRAIN_LAUNCHER=kubernetes, "
                          f"CTRAIN_POD_RUNTIME=kubectl); the {kind} launcher trains on one node: set it to 1")
    if kind == "local":
        return LocalLauncher()
    if kind == "docker":
        return DockerLauncher.from_settings(settings)
    if kind == "kubernetes":
        return KubernetesLauncher.from_settings(settings)
    raise ConfigError(f"CTRAIN_LAUNCHER={kind!r}: expected local, docker or kubernetes")
