"""The registered model as a caller gets it (``trainer.serving``): named output columns, ints accepted,
strings and missing values refused naming the column; and ``mlflow models serve`` serving the champion.

Models are the trainer's own export (``trainer.export.log_model``) of a small network fitted for a few
steps on a separable toy set, so scores are meaningful without running the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training_image"))

FEATURES = ["amount", "age_days", "visits"]
EXPERIMENT = "serving"


def _fitted(task, rng: np.random.Generator):
    """A 3-feature MLP fitted for 50 full-batch steps to a linear rule of the features."""
    import torch

    from trainer.tasks import Task

    assert isinstance(task, Task)
    torch.manual_seed(0)
    x = torch.from_numpy(rng.normal(size=(256, 3)).astype(np.float32))
    z = x @ torch.tensor([1.5, -1.0, 0.5])
    y = {"binary": (z > 0).float(), "multiclass": torch.bucketize(z, torch.tensor([-0.5, 0.5])),
         "regression": z}[task.type]
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, task.num_classes or 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        task.loss(model(x), y).backward()
        optimizer.step()
    return model.eval(), x[:5].numpy()


def _log(tracking_uri: str, task_type: str, num_classes: int | None = None) -> str:
    import mlflow

    from trainer.export import log_model
    from trainer.tasks import Task

    task = Task(task_type, num_classes)
    model, example = _fitted(task, np.random.default_rng(0))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run():
        return log_model(model, task, FEATURES, example)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    # Its own artifact root: the default one of a SQLite store is ./mlruns under the working directory.
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(home / "artifacts").as_uri())
    return uri


@pytest.fixture(scope="module")
def binary_uri(tracking_uri: str) -> str:
    return _log(tracking_uri, "binary")


def _served(uri: str):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri)


def _rows(values) -> pd.DataFrame:
    return pd.DataFrame(values, columns=FEATURES)


def test_binary_output_is_a_score_column(binary_uri: str) -> None:
    scores = _served(binary_uri).predict(_rows([[2.0, -1.0, 0.0], [-2.0, 1.0, 0.0]]))
    assert list(scores.columns) == ["score"]
    assert scores["score"].between(0, 1).all()
    assert scores["score"].iloc[0] > 0.9 > 0.1 > scores["score"].iloc[1]  # the rule was learnt


def test_ints_are_accepted_and_score_as_floats(binary_uri: str) -> None:
    model = _served(binary_uri)
    ints = _rows(np.array([[2, -1, 0], [-3, 1, 4]], dtype="int64"))
    pd.testing.assert_frame_equal(model.predict(ints), model.predict(ints.astype("float64")))


@pytest.mark.parametrize(("value", "says"), [
    ("2.5", "holds str values"), (True, "holds bool values"), (None, "is missing or not finite"),
    (float("nan"), "is missing or not finite"), (float("inf"), "is missing or not finite"),
])
def test_non_numbers_are_refused_naming_the_column(binary_uri: str, value, says: str) -> None:
    from mlflow.exceptions import MlflowException

    frame = pd.DataFrame({"amount": [1.0, 2.0], "age_days": pd.Series([value, 3.0], dtype=object),
                          "visits": [0.0, 1.0]})
    with pytest.raises(MlflowException, match=f"column 'age_days' {says}") as refused:
        _served(binary_uri).predict(frame)
    assert refused.value.get_http_status_code() == 400


def test_multiclass_output_is_one_probability_column_per_class(tracking_uri: str) -> None:
    proba = _served(_log(tracking_uri, "multiclass", 3)).predict(_rows([[2.0, -1.0, 0.0], [-2.0, 1.0, 0.0]]))
    assert list(proba.columns) == ["class_0", "class_1", "class_2"]
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert list(proba.to_numpy().argmax(axis=1)) == [2, 0]


def test_regression_output_is_a_prediction_column(tracking_uri: str) -> None:
    predicted = _served(_log(tracking_uri, "regression")).predict(_rows([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert list(predicted.columns) == ["prediction"]
    assert predicted["prediction"].to_numpy() == pytest.approx([1.5, -1.0], abs=0.3)


def test_the_input_example_is_a_dataframe_over_the_features(binary_uri: str) -> None:
    from mlflow.artifacts import download_artifacts

    served = json.loads((Path(download_artifacts(binary_uri)) / "serving_input_example.json").read_text())
    assert served["dataframe_split"]["columns"] == FEATURES


# ---- mlflow models serve ----------------------------------------------------------------------------
def _post(url: str, payload: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=payload.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _strict_json(body: str):
    """``body`` parsed as standard JSON: a bare ``NaN``/``Infinity`` token fails the test."""
    def no_constants(token: str):
        raise AssertionError(f"response holds a bare {token}: {body[:300]}")

    return json.loads(body, parse_constant=no_constants)


def _frame(rows: list[list]) -> str:
    return json.dumps({"dataframe_split": {"columns": FEATURES, "data": rows}})


@pytest.mark.slow  # starts a scoring server (about 10 s)
def test_mlflow_models_serve_serves_the_champion(tracking_uri: str, binary_uri: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from support import free_port

    # This test's MLflow, whatever an earlier test left as the process's global URIs.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    version = mlflow.register_model(binary_uri, "served_model")
    MlflowClient(tracking_uri).set_registered_model_alias("served_model", "champion", version.version)
    example = (Path(download_artifacts(binary_uri)) / "serving_input_example.json").read_text()

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the server execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", "models:/served_model@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the scoring server did not answer /ping in 120 s"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                time.sleep(0.5)

        status, body = _post(f"{base}/invocations", example)
        assert status == 200, body
        predictions = _strict_json(body)["predictions"]
        assert len(predictions) == 5 and all(set(p) == {"score"} for p in predictions)
        assert all(np.isfinite(p["score"]) and 0 <= p["score"] <= 1 for p in predictions)

        status, ints = _post(f"{base}/invocations", _frame([[2, -1, 0], [-3, 1, 4]]))
        status_f, floats = _post(f"{base}/invocations", _frame([[2.0, -1.0, 0.0], [-3.0, 1.0, 4.0]]))
        assert (status, status_f) == (200, 200), ints + floats
        assert _strict_json(ints) == _strict_json(floats)

        for row, says in (([1.0, "2.5", 0.0], "holds str values"),
                          ([1.0, None, 0.0], "is missing or not finite"),
                          ([1.0, float("nan"), 0.0], "is missing or not finite")):
            status, body = _post(f"{base}/invocations", _frame([row]))
            assert 400 <= status < 500, body
            error = _strict_json(body)  # an error document, never a prediction with a NaN in it
            assert "predictions" not in error and f"column 'age_days' {says}" in error["message"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
