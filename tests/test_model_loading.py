"""Loading a model from the registry never runs code from the artifact store (``ctrain.evaluation.load_model``).

Each crafted model is first loaded the stock way (``mlflow.pyfunc.load_model``) to show the hole is real
(its payload runs), then through ctrain, which must refuse it with nothing executed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training_image"))

WEIGHTS_CONFIG = "model/data/weights/model_weights_config.json"  # a record inside the pt2 archive
PROGRAM = "artifacts/program"  # the pt2 program inside the served model (trainer.export)


class _Payload:
    """Unpickling this creates the marker file: a stand-in for a malicious model."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model as the trainer exports it (trainer.export.log_model), downloaded to a local directory."""
    import mlflow
    import torch
    from mlflow.artifacts import download_artifacts

    from trainer.export import log_model
    from trainer.tasks import Task

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # An experiment with its own artifact location: the SQLite store's default one is ./mlruns in the cwd.
    experiment = mlflow.create_experiment("exported", artifact_location=str(tmp_path / "artifacts"))
    torch.manual_seed(0)
    with mlflow.start_run(experiment_id=experiment):
        uri = log_model(torch.nn.Sequential(torch.nn.Linear(3, 1)), Task("binary", None), ["a", "b", "c"],
                        np.zeros((2, 3), np.float32))
    return Path(download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "model")))


def _rewrite_pt2(model_dir: Path, change: dict[str, bytes]) -> None:
    archive = model_dir / PROGRAM / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as old:
        records = {name: old.read(name) for name in old.namelist()}
    records.update(change)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as new:
        for name, blob in records.items():
            new.writestr(name, blob)


def _pickled_weight(model_dir: Path, marker: Path) -> None:
    """Mark ``model.0.weight`` as pickled and make its record a pickle that runs the payload."""
    with zipfile.ZipFile(model_dir / PROGRAM / "data" / "model.pt2") as archive:
        config = json.loads(archive.read(WEIGHTS_CONFIG))
    entry = config["config"]["model.0.weight"]
    entry["use_pickle"] = True
    _rewrite_pt2(model_dir, {WEIGHTS_CONFIG: json.dumps(config).encode(),
                             f"model/data/weights/{entry['path_name']}": pickle.dumps(_Payload(marker))})


def _code_on_load(model_dir: Path, marker: Path) -> None:
    """Ship a module in ``code/`` and make the pyfunc flavor load through it."""
    (model_dir / "code").mkdir()
    (model_dir / "code" / "evil_loader.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom mlflow.pytorch import _load_pyfunc\n"
    )
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"].update(code="code", loader_module="evil_loader")
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _pickled_model(model_dir: Path, marker: Path) -> None:
    """A pickle-format model (model.pth) instead of the pt2 archive."""
    data = model_dir / PROGRAM / "data"
    (data / "model.pt2").unlink()
    (data / "model.pth").write_bytes(pickle.dumps(_Payload(marker)))
    (data / "pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")


def test_the_exported_model_loads_and_predicts(exported: Path) -> None:
    import pandas as pd

    from ctrain.evaluation import load_model

    model = load_model(str(exported))
    frame = pd.DataFrame({"a": [0.0, 1.0], "b": [0.5, 2.0], "c": [1.0, -1.0]})
    scores = np.asarray(model.predict(frame)).reshape(-1)
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" not in os.environ  # restored after the load


def test_the_serving_code_is_not_run_by_ctrain(exported: Path, tmp_path: Path) -> None:
    """The served model's code (trainer.serving, copied into the model) is for whoever serves it; ctrain
    scores the pt2 program beside it, so an edited copy runs nothing here."""
    import pandas as pd

    from ctrain.evaluation import load_model

    marker = tmp_path / "serving-code-ran"
    (exported / "serving.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    model = load_model(str(exported))
    scores = np.asarray(model.predict(pd.DataFrame({"a": [0.0], "b": [0.5], "c": [1.0]}))).reshape(-1)
    assert not marker.exists() and ((scores > 0) & (scores < 1)).all()


def test_the_bare_program_of_an_earlier_export_loads(exported: Path) -> None:
    """A model exported before the serving layer (the pt2 program alone) is still scored, so the champion
    of an earlier release can be compared."""
    import pandas as pd

    from ctrain.evaluation import input_names, load_model

    model = load_model(str(exported / PROGRAM))
    assert input_names(model) == ["a", "b", "c"]
    assert np.asarray(model.predict(pd.DataFrame({"a": [0.0], "b": [0.5], "c": [1.0]}))).shape == (1, 1)


@pytest.mark.parametrize("craft", [_pickled_weight, _code_on_load, _pickled_model])
def test_a_crafted_model_is_refused_and_runs_nothing(exported: Path, tmp_path: Path, craft) -> None:
    import mlflow.pyfunc

    from ctrain.errors import DataError
    from ctrain.evaluation import load_model

    stock_marker, ours_marker = tmp_path / "ran-under-stock-mlflow", tmp_path / "ran-under-ctrain"
    stock = tmp_path / "stock"
    shutil.copytree(exported, stock)
    craft(stock, stock_marker)
    try:  # the hole: MLflow's default load executes the payload (and may then fail)
        mlflow.pyfunc.load_model(str(stock))
    except Exception:
        pass
    assert stock_marker.exists(), "the crafted model should run code under a stock load"

    craft(exported, ours_marker)
    with pytest.raises(DataError, match="refused") as refused:
        load_model(str(exported))
    assert not ours_marker.exists()
    assert str(exported) in str(refused.value)
