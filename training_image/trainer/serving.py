"""The registered model as a caller sees it: named output columns over the exported pt2 program.

``trainer.export`` logs this file as an MLflow *models-from-code* model (nothing pickled): the MLflow
model's ``python_function`` flavor runs :class:`ServedModel`, which loads the pt2 program stored beside it
(artifact ``program``, an MLflow pytorch model in ``pt2`` form) and

- takes a DataFrame with the feature columns (extra columns are ignored, order does not matter); integer
  values are accepted and cast to float, while strings (even numeric ones), booleans, nulls, NaN and
  infinities are refused with an error naming the column;
- returns one named column per output: ``score`` (probability of class 1, binary), ``class_0`` ..
  ``class_{k-1}`` (class probabilities, multiclass) or ``prediction`` (regression).

Serve it with ``mlflow models serve -m models:/<name>@champion --env-manager local``. The file imports
only mlflow, numpy and pandas: it is copied into the model and executed by whoever serves it, not by
ctrain's control plane (``ctrain.evaluation.load_model`` scores the pt2 program and never runs it).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


def checked_features(frame: pd.DataFrame, feature_columns: list[str]) -> pd.DataFrame:
    """``frame``'s feature columns as float64, or an ``INVALID_PARAMETER_VALUE`` error (HTTP 400) naming
    the first column that holds something other than finite numbers."""
    if not isinstance(frame, pd.DataFrame):
        raise _refused(f"expected a table with the columns {feature_columns}, got {type(frame).__name__}")
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise _refused(f"missing feature column(s) {missing}; the model takes {feature_columns}")
    out = {}
    for name in feature_columns:
        column = frame[name]
        if pd.api.types.is_bool_dtype(column) or not (
            pd.api.types.is_numeric_dtype(column) or _all_numbers(column)
        ):
            kinds = sorted({type(v).__name__ for v in column if not (v is None or _is_number(v))})
            raise _refused(f"column {name!r} holds {'/'.join(kinds) or 'non-numeric'} values; "
                           "send numbers (int or float), not strings or booleans")
        values = column.astype("float64")
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            rows = [int(i) for i in np.flatnonzero(bad)[:5]]
            raise _refused(f"column {name!r} is missing or not finite at row(s) {rows}; every feature must be "
                           "a finite number (impute nulls before scoring)")
        out[name] = values
    return pd.DataFrame(out, index=frame.index)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _all_numbers(column: pd.Series) -> bool:  # None is a missing number, refused below as missing
    return column.dtype == object and all(v is None or _is_number(v) for v in column)


def _refused(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"input refused: {message}")


class ServedModel(PythonModel):
    """Validate the features, run the pt2 program, name its outputs (see the module docstring)."""

    def load_context(self, context) -> None:
        config = context.model_config
        self.feature_columns = list(config["feature_columns"])
        self.output_columns = list(config["output_columns"])
        self.program = mlflow.pyfunc.load_model(context.artifacts[config["program"]])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        features = checked_features(model_input, self.feature_columns)
        outputs = np.asarray(self.program.predict(features), dtype="float64").reshape(len(features), -1)
        return pd.DataFrame(outputs, columns=self.output_columns, index=features.index)


set_model(ServedModel())
