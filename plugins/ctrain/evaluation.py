"""Score a registered-model candidate and the current champion on the same test split."""

from __future__ import annotations


def read_split(snapshot_uri: str, split: str):
    import pandas as pd

    from ctrain.features import open_fs, read_manifest

    manifest = read_manifest(snapshot_uri)
    fs, path = open_fs(f"{snapshot_uri}/{manifest['splits'][split]['file']}")
    with fs.open(path, "rb") as fh:
        return pd.read_parquet(fh), manifest


def load_model(model_uri: str):
    """The MLflow model at ``model_uri`` as a pyfunc (pt2 / safetensors: no pickle from storage)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)


def input_names(model) -> list[str]:
    """Input column names of a loaded pyfunc model's signature."""
    schema = model.metadata.get_input_schema()
    return list(schema.input_names()) if schema is not None else []


def score_model(model, snapshot_uri: str, split: str = "test") -> dict[str, float]:
    """ROC AUC, PR AUC and row count of a loaded pyfunc ``model`` on ``split`` of the snapshot."""
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    frame, manifest = read_split(snapshot_uri, split)
    features = frame[manifest["feature_columns"]].astype("float32")
    scores = np.asarray(model.predict(features)).reshape(-1)
    labels = frame[manifest["label_column"]].to_numpy()
    return {
        f"{split}_roc_auc": float(roc_auc_score(labels, scores)),
        f"{split}_pr_auc": float(average_precision_score(labels, scores)),
        f"{split}_rows": float(len(frame)),
    }
