"""The final model as served: an MLflow model with named outputs over a pt2 program (no pickle), plus
safetensors weights.

``model/`` is ``trainer.serving`` logged as models-from-code: it takes a DataFrame with the feature
columns and returns named columns (``score``, ``class_<k>`` or ``prediction``, see ``Task.output_columns``).
Its artifact ``program`` is the exported graph, an MLflow pytorch model in ``pt2`` form: raw feature
values ``(batch, num_features)`` in manifest column order in, the task's prediction out; scaling and the
output transform are part of the graph, so neither needs preprocessing. ``ctrain.evaluation`` scores the
program alone and never runs the serving code.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import AnyType
from safetensors.torch import save_file
from torch import Tensor, nn

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.tasks import Task

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"
# The models-from-code file that serves the model, and the name of its artifact holding the pt2 program.
SERVING_CODE = Path(__file__).with_name("serving.py")
PROGRAM_ARTIFACT = "program"


class ServingModel(nn.Module):
    """Trained model followed by the task's output transform (sigmoid / softmax / identity)."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, features: Tensor) -> Tensor:
        return self.task.predict(self.model(features.to(torch.float32)))


FACTORY_CONTRACT_DOC = "training_image/README.md, section 'Bring your own model'"
_EXPORT_ERROR_LINES = 8  # of the torch.export error quoted in the message (its first lines say why)


def check_exportable(model: nn.Module, task: Task, sample: Tensor, factory: str) -> None:
    """Export the serving module on ``sample`` the way :func:`log_model` will (``torch.export`` with a
    dynamic batch dimension), so a model that cannot be served fails before the first step, not after
    the last epoch. Raises ConfigError naming ``factory``; the model is left in training mode."""
    serving = ServingModel(model, task).eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.export.export(serving, (sample,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as exc:
        lines = [line for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
        quoted = "\n    ".join(lines[:_EXPORT_ERROR_LINES])
        raise ConfigError(
            f"the export of model.factory={factory} failed: the model must be exportable with "
            f"torch.export (it is served as an exported graph), checked on a sample batch of "
            f"{len(sample)} train rows before the first step. The export error:\n    {quoted}\n"
            f"See the model factory contract in {FACTORY_CONTRACT_DOC} (no Python control flow on "
            "tensor values: use torch.where / torch.cond)."
        ) from None
    finally:
        model.train()


def log_model(model: nn.Module, task: Task, feature_columns: list[str], example: np.ndarray) -> str:
    """Log the served model to the active MLflow run; return its logged model's ``models:/m-<id>`` URI.

    The MLflow model is ``trainer.serving`` (models-from-code, see there for the served contract) with
    the pt2 program as its artifact ``program``; its input example is ``example`` as a DataFrame over
    ``feature_columns``, the request ``mlflow models serve`` is checked to accept at log time.

    The run holds one logged model: one an earlier attempt left behind (``PENDING`` when it was killed
    inside ``log_model``, ``READY`` when it died before writing ``result.json``) is deleted first, so
    searches for the run's model find only this one. (Logging into the earlier model instead is not
    possible: MLflow links a run to a model output once.)
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model needs the tracker's active MLflow run")
    _delete_earlier_models(run.info.run_id, run.info.experiment_id)
    outputs = task.output_columns
    metadata = {"feature_columns": feature_columns, "output_columns": outputs, "task": task.type}
    # Pinned explicitly: requirement inference would reload the model in a subprocess.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    # The logged model exists (PENDING) before the program is traced, so an attempt killed while tracing
    # leaves it behind for the rerun to delete, like one killed inside MLflow's own logging.
    params = MlflowClient().get_run(run.info.run_id).data.params
    logged = mlflow.initialize_logged_model(name=MODEL_ARTIFACT_PATH, source_run_id=run.info.run_id, params=params)
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / PROGRAM_ARTIFACT
        _save_program(ServingModel(model, task).eval(), task, feature_columns, example, program, requirements)
        # Inputs are typed Any so the scoring server passes them through as sent: with "double" it would
        # turn "2.5" and true into numbers; trainer.serving checks every value and casts ints itself.
        signature = ModelSignature(
            inputs=Schema([ColSpec(AnyType(), name) for name in feature_columns]),
            outputs=Schema([ColSpec("double", name) for name in outputs]),
        )
        mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            model_id=logged.model_id,
            python_model=str(SERVING_CODE),
            artifacts={PROGRAM_ARTIFACT: str(program)},
            model_config={"feature_columns": feature_columns, "output_columns": outputs, "program": PROGRAM_ARTIFACT},
            signature=signature,
            input_example=pd.DataFrame(np.asarray(example, dtype=np.float64), columns=feature_columns),
            metadata=metadata,
            pip_requirements=requirements,
        )
        weights = Path(tmp) / "model.safetensors"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(
            state, str(weights), metadata={"feature_columns": json.dumps(feature_columns), "task": task.type}
        )
        mlflow.log_artifact(str(weights), "weights")
    return f"models:/{logged.model_id}"


def _save_program(serving_model: ServingModel, task: Task, feature_columns: list[str], example: np.ndarray,
                  path: Path, requirements: list[str]) -> None:
    """Save the pt2 program (an MLflow pytorch model, no pickle) to ``path``."""
    outputs_shape = (-1, task.num_classes) if task.type == "multiclass" and task.num_classes else (-1,)
    outputs = Schema([TensorSpec(np.dtype(np.float32), outputs_shape)])
    mlflow.pytorch.save_model(
        serving_model,
        str(path),
        serialization_format="pt2",
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(feature_columns)))]), outputs=outputs
        ),
        input_example=np.ascontiguousarray(example, dtype=np.float32),
        pip_requirements=requirements,
    )
    # pt2 tracing needs a tensor signature; the program is called with a DataFrame over the named
    # feature columns (float32 or float64), matched by name, not position.
    program = Model.load(str(path))
    program.signature = ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in feature_columns]), outputs=outputs
    )
    program.save(str(path / "MLmodel"))


def _delete_earlier_models(run_id: str, experiment_id: str) -> None:
    """Delete the logged models named ``model`` that ``run_id`` already has (any status)."""
    client = MlflowClient()
    for model in client.search_logged_models(
        [experiment_id], filter_string=f"name = '{MODEL_ARTIFACT_PATH}' AND source_run_id = '{run_id}'"
    ):
        log.info("deleting logged model %s (%s) of an earlier attempt", model.model_id, model.status)
        client.delete_logged_model(model.model_id)
