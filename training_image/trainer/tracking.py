"""Rank-0 MLflow tracking: one run per training (handed in by ``MLFLOW_RUN_ID`` or created here).

Every method is a no-op on ranks other than 0. Per-step metrics go out asynchronously in batches;
on resume, steps the run already has are not logged again, so a resumed run has no duplicate points.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.types import ColSpec, Schema

if TYPE_CHECKING:
    from trainer.config import TrackingConfig

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters and a batch at 100 params.
_PARAM_MAX = 6000
_PARAM_BATCH = 100
_BATCH_MAX = 1000  # metrics per log_batch call


class Tracker:
    """MLflow logging for rank 0."""

    def __init__(self, cfg: TrackingConfig, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._last_step: dict[str, int] = {}  # metric key -> highest step already in the run
        self._buffer: list[Metric] = []
        self._params: dict[str, str] = {}  # params the run already has (a resumed or handed-in run)
        self._flushed_at = time.monotonic()

    def start(self, resume_run_id: str | None) -> str | None:
        """Open the run: ``MLFLOW_RUN_ID``, else ``resume_run_id`` (the run of the checkpoint we resume,
        or of an earlier attempt of this job, from the checkpoint lease), else a new one."""
        if not self.enabled:
            return None
        run_id = os.environ.get("MLFLOW_RUN_ID") or resume_run_id
        if run_id is None:
            mlflow.set_experiment(self.cfg.experiment)
        if self.cfg.system_metrics:
            mlflow.set_system_metrics_sampling_interval(self.cfg.system_metrics_interval_s)
        run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else self.cfg.run_name,
            log_system_metrics=self.cfg.system_metrics,
        )
        self.run_id = run.info.run_id
        self._client = MlflowClient()
        if run_id is not None:
            self._last_step = _logged_steps(self._client, self.run_id)
            self._params = dict(self._client.get_run(self.run_id).data.params)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values are stringified and truncated to MLflow's limit)."""
        if not self.enabled:
            return
        items = []
        for key, value in params.items():
            text = str(value)[:_PARAM_MAX]
            previous = self._params.get(key)
            if previous is None:
                items.append((key, text))
            elif previous != text:  # MLflow params are immutable; a resume may change a few
                log.warning("param %s was %r in this run and is now %r (not re-logged)", key, previous, text)
        for start in range(0, len(items), _PARAM_BATCH):
            mlflow.log_params(dict(items[start : start + _PARAM_BATCH]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tag this trainer's run, by id: no-op before :meth:`start` (MLflow's fluent ``set_tags`` would
        open a new run in the ``Default`` experiment when there is no active one)."""
        if not self.enabled or self._client is None or self.run_id is None:
            return
        self._client.log_batch(
            self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True
        )

    def log_dataset(
        self, *, source: str, name: str, digest: str, columns: dict[str, str], tags: dict[str, str]
    ) -> None:
        """Record the snapshot as the run's training input: its URI, digest (= dataset version),
        column schema and ``tags`` (row counts...). Metadata only: inferring a schema from the
        data itself would cost MLflow tens of seconds per million rows."""
        if not self.enabled:
            return
        with warnings.catch_warnings():
            # file:// sources match two equivalent resolvers in MLflow's registry; either is right.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            resolved = resolve_dataset_source(source)
        schema = Schema([ColSpec(kind, column) for column, kind in columns.items()])
        dataset = MetaDataset(resolved, name=name, digest=digest, schema=schema)
        mlflow.log_input(dataset, context="training", tags=tags)

    def log_metrics(self, metrics: dict[str, float], step: int, *, buffered: bool = False) -> None:
        """Log metrics at ``step``, skipping keys whose step the run already holds (resume).

        ``buffered`` metrics are collected and sent in one batch every ``tracking.flush_every_s``
        seconds (and by :meth:`flush`): each MLflow write costs milliseconds of Python in this
        process, which per-step logging would otherwise take from training.
        """
        if not self.enabled or self._client is None or self.run_id is None:
            return
        timestamp = int(time.time() * 1000)
        self._buffer += [
            Metric(key, float(value), timestamp, step)
            for key, value in metrics.items()
            if step > self._last_step.get(key, -1)
        ]
        due = time.monotonic() - self._flushed_at >= self.cfg.flush_every_s or len(self._buffer) >= _BATCH_MAX
        if not buffered or due:
            self.flush(synchronous=not buffered)

    def flush(self, synchronous: bool = False) -> None:
        """Send buffered metrics (asynchronously unless ``synchronous`` or async logging is off)."""
        if self._client is None or self.run_id is None:
            return
        while self._buffer:
            batch, self._buffer = self._buffer[:_BATCH_MAX], self._buffer[_BATCH_MAX:]
            self._client.log_batch(
                self.run_id, metrics=batch, synchronous=synchronous or not self.cfg.async_logging
            )
        self._flushed_at = time.monotonic()

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """Log ``data`` as a JSON or YAML artifact (by the file's extension)."""
        if self.enabled:
            mlflow.log_dict(data, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            mlflow.log_figure(figure, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str) -> None:
        if self.enabled:
            mlflow.log_artifact(local_path, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush async logging and close the run with ``status`` (FINISHED, FAILED, KILLED)."""
        if not self.enabled or self._client is None or self.run_id is None:
            return
        status = RunStatus.to_string(RunStatus.from_string(status))
        try:
            self.flush()
            mlflow.flush_async_logging()
        finally:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)
            else:  # already ended in this process: close it by id, never through a new active run
                self._client.set_terminated(self.run_id, status)


def _logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """Highest step per metric key already in the run."""
    return {
        key: max(m.step for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
        if not key.startswith("system/")  # written by MLflow's own monitor, never by us
    }
