"""Score a registered-model candidate and the current champion on the same test split.

The metrics are the pipeline definition's (``metrics.primary`` and ``metrics.report``), computed from the
served model's output for the definition's task (``ctrain.definition.TASK_METRICS``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctrain.definition import PipelineDefinition
    from ctrain.settings import Settings


def read_split(snapshot_uri: str, split: str, settings: Settings | None = None):
    """One split of a snapshot (sha256-verified, :func:`ctrain.snapshot.read_frame`) and its manifest."""
    from ctrain.snapshot import read_frame

    manifest, frame = read_frame(snapshot_uri, (split,), settings=settings)
    return frame, manifest


# What trainer.export logs, and so all a ctrain model may be: the served model (trainer.serving,
# models-from-code) whose one artifact is the pt2 program, a pytorch-flavor model with no code and no
# pickle anywhere in it. ctrain scores the program alone, through mlflow.pytorch's own loader: the serving
# code is for whoever serves the model and never runs here. (A model exported before the serving layer,
# the bare program, is still accepted, so a champion of an earlier release can be scored.)
_SERVED_LOADER = "mlflow.pyfunc.loaders.code_model"
_PROGRAM_FLAVORS = {"python_function", "pytorch"}
_PICKLE_FILES = ("model.pth", "pickle_module_info.txt")


def load_model(model_uri: str, settings: Settings | None = None):
    """The pt2 program of the MLflow model at ``model_uri`` as a pyfunc, refusing anything that could run
    code on load.

    A model is a file in the artifact store, which whoever can write there or register a version
    controls; loading it must not execute what it contains. The model is downloaded once (so it cannot
    change between the check and the load) from the settings' MLflow (:func:`ctrain.registry.mlflow_at`,
    never whatever the process's global MLflow state says; without settings only a local path makes
    sense); it must be what ``trainer.export`` writes (the served model, whose code is not run, over one
    ``program`` artifact), the program's ``MLmodel`` must have flavors python_function + pytorch, loader
    ``mlflow.pytorch``, no ``code``, a ``data/model.pt2`` and no pickled model file anywhere, and it is
    loaded with MLflow's pickle deserialization off, under which MLflow admits a pt2 archive only if every
    record is JSON, text or accepted by ``torch.load(weights_only=True)``. The program's ``predict``
    returns the served values unnamed, in the served column order.
    """
    import tempfile
    from pathlib import Path

    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from ctrain.registry import mlflow_at

    at = mlflow_at(settings) if settings is not None else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="ctrain-model-") as tmp, at:
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        program = _checked_program(model_uri, local)
        with _pickle_deserialization_off():
            try:
                return mlflow.pyfunc.load_model(str(program))
            except MlflowException as exc:  # a pt2 record that is not pickle-free, or not a model at all
                raise _refusal(model_uri, str(exc).splitlines()[0]) from None


def _refusal(model_uri: str, why: str):
    from ctrain.errors import DataError

    return DataError(
        f"model {model_uri} refused: {why}. ctrain loads only the pt2 models its trainer exports "
        "(trainer.export.log_model); register one of those instead"
    )


def _flavors(model_uri: str, model_dir) -> dict:
    import yaml

    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise _refusal(model_uri, f"no readable MLmodel file ({type(exc).__name__})") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict) or not all(isinstance(f, dict) for f in flavors.values()):
        raise _refusal(model_uri, f"its MLmodel has no flavors mapping ({flavors!r})")
    return flavors


def _checked_program(model_uri: str, local):
    """The directory of the pt2 program inside the downloaded model ``local``, once both are checked."""
    def refuse(why: str):
        return _refusal(model_uri, why)

    pickled = [p.name for p in local.rglob("*") if p.name in _PICKLE_FILES]
    if pickled:
        raise refuse(f"it contains pickled files {sorted(pickled)}")
    program = local
    flavors = _flavors(model_uri, local)
    if set(flavors) == {"python_function"} and flavors["python_function"].get("loader_module") == _SERVED_LOADER:
        artifacts = flavors["python_function"].get("artifacts")
        paths = [a.get("path") for a in artifacts.values() if isinstance(a, dict)] if isinstance(artifacts, dict) else []
        program = (local / str(paths[0])).resolve() if len(paths) == 1 and paths[0] else None
        if program is None or not program.is_relative_to(local.resolve()) or not program.is_dir():
            raise refuse(f"its served model has artifacts {artifacts!r}, expected one pt2 program directory")
        flavors = _flavors(model_uri, program)
    if set(flavors) != _PROGRAM_FLAVORS:
        raise refuse(f"flavors {sorted(flavors)}, expected {sorted(_PROGRAM_FLAVORS)} (or the served model "
                     "over such a program)")
    pyfunc, pytorch = flavors["python_function"], flavors["pytorch"]
    if pyfunc.get("loader_module") != "mlflow.pytorch":
        raise refuse("its python_function flavor does not load through mlflow.pytorch")
    if any(f.get("code") for f in (pyfunc, pytorch)):
        raise refuse("it ships code that would be imported on load")
    if not (program / str(pyfunc.get("data", "data")) / "model.pt2").is_file():
        raise refuse("it has no data/model.pt2 (a pickled model is not accepted)")
    return program


class _pickle_deserialization_off:
    """``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` for the duration (MLflow reads it at load time)."""

    _VAR = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"

    def __enter__(self) -> None:
        import os

        self._saved = os.environ.get(self._VAR)
        os.environ[self._VAR] = "false"

    def __exit__(self, *exc: object) -> None:
        import os

        if self._saved is None:
            os.environ.pop(self._VAR, None)
        else:
            os.environ[self._VAR] = self._saved


def input_names(model) -> list[str]:
    """Input column names of a loaded pyfunc model's signature."""
    schema = model.metadata.get_input_schema()
    return list(schema.input_names()) if schema is not None else []


def score_model(model, snapshot_uri: str, definition: PipelineDefinition, split: str = "test",
                settings: Settings | None = None) -> dict[str, float]:
    """Every metric of ``definition`` (its primary and report metrics) for a loaded pyfunc ``model`` on
    ``split`` of the snapshot, as ``{split}_{metric}``, plus ``{split}_rows``.

    ``model`` is what :func:`load_model` returns, the pt2 program: its outputs are the served values
    (the served model only names them ``score``, ``class_<k>`` or ``prediction``): the probability of
    class 1 (binary), one probability per class in class order (multiclass) or the value (regression);
    the metrics are computed from them.
    """
    frame, manifest = read_split(snapshot_uri, split, settings)
    return scores(definition, frame[manifest["label_column"]].to_numpy(), predict(model, frame, manifest), split)


def predict(model, frame, manifest: dict):
    """The served outputs of ``model`` for every row of ``frame`` (float64, one row per input row)."""
    import numpy as np

    return np.asarray(model.predict(frame[manifest["feature_columns"]].astype("float32")), dtype="float64")


def scores(definition: PipelineDefinition, labels, outputs, split: str = "test") -> dict[str, float]:
    """``{split}_{metric}`` for every metric of ``definition`` from ``labels`` and served ``outputs``."""
    wanted = [m.removeprefix("test_") for m in definition.test_metrics]
    metrics = _metric_functions()[definition.task.type]
    values = {f"{split}_{name}": float(metrics[name](labels, outputs)) for name in wanted}
    return {**values, f"{split}_rows": float(len(labels))}


def metric_function(task: str, name: str):
    """f(labels, served outputs) -> the metric ``name`` of ``task`` (a name of TASK_METRICS)."""
    return _metric_functions()[task][name]


def output_columns(prefix: str, outputs) -> dict:
    """Served outputs as named columns of the predictions file: ``prefix`` (one value per row) or
    ``prefix_<k>`` (one per class)."""
    flat = outputs.reshape(len(outputs), -1)
    if flat.shape[1] == 1:
        return {prefix: flat[:, 0]}
    return {f"{prefix}_{k}": flat[:, k] for k in range(flat.shape[1])}


def predictions_table(labels, challenger, champion, slices: dict):
    """The per-row evaluation record: label, both models' outputs on the same rows, the slice columns."""
    import pandas as pd

    columns = {"label": labels, **output_columns("challenger", challenger)}
    if champion is not None:
        columns.update(output_columns("champion", champion))
    return pd.DataFrame({**columns, **slices})


def model_bytes(model_uri: str, settings: Settings | None = None) -> int:
    """Bytes of every artifact of the MLflow model at ``model_uri`` (what a deployment downloads)."""
    import tempfile
    from pathlib import Path

    from mlflow.artifacts import download_artifacts

    from ctrain.registry import mlflow_at

    at = mlflow_at(settings) if settings is not None else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="ctrain-size-") as tmp, at:
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        return sum(p.stat().st_size for p in local.rglob("*") if p.is_file())


def latency_p95_ms(model, frame, manifest: dict, batch_rows: int, batches: int, seed: int = 0) -> float:
    """p95 wall milliseconds of ``model.predict`` on ``batches`` batches of ``batch_rows`` test rows (drawn
    with replacement, seeded), after one warm-up batch, on this process's CPU."""
    import time

    import numpy as np

    features = frame[manifest["feature_columns"]].astype("float32")
    rng = np.random.default_rng(seed)
    timings = []
    for i in range(batches + 1):
        batch = features.iloc[rng.integers(0, len(features), batch_rows)]
        started = time.perf_counter()
        model.predict(batch)
        if i:  # the first batch warms up the program
            timings.append((time.perf_counter() - started) * 1000)
    return float(np.quantile(timings, 0.95))


def _binary(predictions):  # one value per row: probability of class 1, or the regression value
    return predictions.reshape(-1)


def _multiclass(predictions):  # one probability per class and row
    return predictions.reshape(len(predictions), -1)


def _metric_functions():
    """Metric name -> f(labels, served predictions), per task: the names of ctrain.definition.TASK_METRICS."""
    from sklearn import metrics as m

    return {
        "binary": {
            "roc_auc": lambda y, p: m.roc_auc_score(y, _binary(p)),
            "pr_auc": lambda y, p: m.average_precision_score(y, _binary(p)),
            "accuracy": lambda y, p: m.accuracy_score(y, _binary(p) >= 0.5),
            "log_loss": lambda y, p: m.log_loss(y, _binary(p), labels=[0, 1]),
        },
        "multiclass": {
            "accuracy": lambda y, p: m.accuracy_score(y, _multiclass(p).argmax(axis=1)),
            "macro_f1": lambda y, p: m.f1_score(y, _multiclass(p).argmax(axis=1), average="macro"),
            "log_loss": lambda y, p: m.log_loss(y, _multiclass(p), labels=list(range(_multiclass(p).shape[1]))),
        },
        "regression": {
            "rmse": lambda y, p: m.root_mean_squared_error(y, _binary(p)),
            "mae": lambda y, p: m.mean_absolute_error(y, _binary(p)),
            "r2": lambda y, p: m.r2_score(y, _binary(p)),
        },
    }

