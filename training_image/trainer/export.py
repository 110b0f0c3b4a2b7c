"""The final model as served: MLflow model (``pt2``, no pickle) plus safetensors weights.

The served module takes raw feature values ``(batch, num_features)`` float32 in manifest column order
and returns the prediction (the probability of class 1 for the binary task): scaling and the output transform
are part of the exported graph, so ``mlflow.pyfunc.load_model(uri).predict(df[feature_columns])``
needs no preprocessing.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import ModelSignature, set_signature
from mlflow.types import ColSpec, Schema, TensorSpec
from safetensors.torch import save_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from trainer.tasks import Task

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"


class ServingModel(nn.Module):
    """Trained model followed by the task's output transform (sigmoid / softmax / identity)."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, features: Tensor) -> Tensor:
        return self.task.predict(self.model(features.to(torch.float32)))


def log_model(model: nn.Module, task: Task, feature_columns: list[str], example: np.ndarray) -> str:
    """Log the serving model to the active MLflow run; return its logged model's ``models:/m-<id>`` URI.

    The run holds one logged model: one an earlier attempt left behind (``PENDING`` when it was killed
    inside ``log_model``, ``READY`` when it died before writing ``result.json``) is deleted first, so
    searches for the run's model find only this one. (Logging into the earlier model instead is not
    possible: MLflow links a run to a model output once.)
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model needs the tracker's active MLflow run")
    _delete_earlier_models(run.info.run_id, run.info.experiment_id)
    serving = ServingModel(model, task).eval()
    outputs_shape = (-1, task.num_classes) if task.type == "multiclass" and task.num_classes else (-1,)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(feature_columns)))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), outputs_shape)]),
    )
    metadata = {"feature_columns": feature_columns, "task": task.type}
    info = mlflow.pytorch.log_model(
        serving,
        name=MODEL_ARTIFACT_PATH,
        serialization_format="pt2",
        signature=signature,
        input_example=np.ascontiguousarray(example, dtype=np.float32),
        metadata=metadata,
        # Pinned explicitly: requirement inference would reload the model in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    # pt2 tracing needs a tensor signature; serving wants one over the named feature columns, so
    # callers can pass a DataFrame (float32 or float64) and columns are matched by name, not position.
    set_signature(
        info.model_uri,
        ModelSignature(
            inputs=Schema([ColSpec("double", name) for name in feature_columns]), outputs=signature.outputs
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(
            state, str(weights), metadata={"feature_columns": json.dumps(feature_columns), "task": task.type}
        )
        mlflow.log_artifact(str(weights), "weights")
    return info.model_uri


def _delete_earlier_models(run_id: str, experiment_id: str) -> None:
    """Delete the logged models named ``model`` that ``run_id`` already has (any status)."""
    client = MlflowClient()
    for model in client.search_logged_models(
        [experiment_id], filter_string=f"name = '{MODEL_ARTIFACT_PATH}' AND source_run_id = '{run_id}'"
    ):
        log.info("deleting logged model %s (%s) of an earlier attempt", model.model_id, model.status)
        client.delete_logged_model(model.model_id)
