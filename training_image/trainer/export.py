"""The final model as served: MLflow model (``pt2``, no pickle) plus safetensors weights.

The served module takes raw feature values ``(batch, num_features)`` float32 in manifest column order
and returns the prediction (fraud probability for the binary task): scaling and the output transform
are part of the exported graph, so ``mlflow.pyfunc.load_model(uri).predict(df[feature_columns])``
needs no preprocessing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature, set_signature
from mlflow.types import ColSpec, Schema, TensorSpec
from safetensors.torch import save_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from trainer.tasks import Task

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
    """Log the serving model to the active MLflow run; return its ``runs:/<id>/model`` URI."""
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
    run = mlflow.active_run()
    assert run is not None  # the caller logs inside the tracker's run
    return f"runs:/{run.info.run_id}/{MODEL_ARTIFACT_PATH}"
