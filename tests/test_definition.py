"""Pipeline definitions (``ctrain.definition``): every shipped one is valid, bad ones are refused naming
the field and the rule, and the generated schema and docs table are current."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
import yaml

from ctrain.definition import PROJECT_ROOT, definition_files, json_schema, load_all, load_file, markdown_table
from ctrain.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

PIPELINES = PROJECT_ROOT / "pipelines"


def test_every_shipped_definition_is_valid_and_points_at_real_files() -> None:
    definitions = load_all(PIPELINES)
    assert "fraud" in definitions
    for definition in definitions.values():
        assert definition.trainer_config_path().is_file(), definition.training.config
        assert definition.dag_id == f"continuous_training__{definition.name}"
        assert definition.primary_test_metric in definition.test_metrics


def _fraud() -> dict:
    return yaml.safe_load((PIPELINES / "fraud.yaml").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["metrics"].update(primary="rmse"), "metric 'rmse' is not computed for task 'binary'"),
        (lambda d: d["metrics"].update(direction="lower"), "roc_auc improves when higher, not lower"),
        (lambda d: d["events"].update(label_column="amount"), "amount named twice"),
        (lambda d: d["validation"].update(target_range={"min": 0}), "target_range applies to regression"),
        (lambda d: d["validation"]["feature_ranges"].update(amount={"min": 5, "max": 1}), "min 5.0 is above max 1.0"),
        (lambda d: d["task"].update(type="multiclass"), "num_classes is required for, and only for"),
        (lambda d: d.update(colour="blue"), "colour: Extra inputs are not permitted"),
        (lambda d: d.pop("governance"), "governance: Field required"),
    ],
)
def test_a_bad_definition_is_refused_naming_the_field_and_the_rule(tmp_path: Path, change, message: str) -> None:
    tree = _fraud()
    change(tree)
    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="pipeline definition .*fraud.yaml is invalid") as refused:
        load_file(path)
    assert message in str(refused.value)


def test_the_file_name_is_the_pipeline_name(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text((PIPELINES / "fraud.yaml").read_text())
    with pytest.raises(ConfigError, match="file name must be fraud.yaml"):
        load_file(path)


def test_check_command_exits_65_on_a_bad_definition(tmp_path: Path) -> None:
    bad = tmp_path / "fraud.yaml"
    bad.write_text("name: fraud\n")
    proc = subprocess.run([sys.executable, "-m", "ctrain.definition", "check", str(PIPELINES / "fraud.yaml"),
                           str(bad)], capture_output=True, text=True)
    assert proc.returncode == 65
    assert "fraud.yaml: ok (binary, primary roc_auc)" in proc.stdout
    assert "owner: Field required" in proc.stderr


def test_generated_schema_and_docs_table_are_current() -> None:
    assert json.loads((PIPELINES / "definition.schema.json").read_text()) == json_schema()
    assert markdown_table() in (PIPELINES / "README.md").read_text()
    assert [p.name for p in definition_files(PIPELINES)] == sorted(
        p.name for p in PIPELINES.glob("*.yaml"))
