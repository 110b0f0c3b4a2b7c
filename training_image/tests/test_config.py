"""Config loading: YAML + overrides, validation messages, hash, schema, and the CLI's exit code 65."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_testkit import CONFIGS

from trainer.config import TrainerConfig, apply_override, json_schema, load_config, markdown_table
from trainer.errors import ConfigError

REQUIRED = ["data.dataset_uri=file:///d", "checkpoint.uri=file:///c", "output.uri=file:///o"]


def test_yaml_and_overrides_are_coerced_to_field_types() -> None:
    cfg = load_config(
        CONFIGS / "debug.yaml",
        [*REQUIRED, "train.epochs=7", "optimizer.lr=1e-4", "train.grad_clip_norm=null"],
    )
    assert cfg.train.epochs == 7
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.train.grad_clip_norm is None
    assert cfg.model.kwargs == {"hidden_sizes": [16], "dropout": 0.1}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochz=3", "train.epochz: unknown key; allowed keys here: batch_size, "),
        ("bogus.key=1", "bogus: unknown key; allowed keys here: checkpoint, data, distributed"),
        ("train.epochs=0", "train.epochs: Input should be greater than or equal to 1"),
        ("train.epochs=many", "train.epochs: Input should be a valid integer"),
        ("optimizer.name=adam", "optimizer.name: Input should be 'adamw' or 'sgd'"),
        ("scheduler.name=linear", "'constant', 'warmup_cosine', 'step' or 'plateau'"),
        ("early_stopping.monitor=val_rmse", "allowed: val_loss, val_roc_auc, val_pr_auc, val_accuracy"),
        ("task.type=multiclass", "task.num_classes is required when task.type is 'multiclass'"),
        ("train.grad_accum_steps=3", "must be divisible by train.grad_accum_steps (3)"),
        ("model.factory=not a path", "model.factory: String should match pattern"),
        ("train=5", "train: Input should be a valid dictionary"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "debug.yaml", [*REQUIRED, override])
    assert expected in str(err.value)


def test_credentials_in_a_uri_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "debug.yaml", [*REQUIRED, "checkpoint.uri=s3://AKIAEXAMPLE:hunter2@bucket/ck"])
    message = str(err.value)
    assert "checkpoint.uri: the URI embeds a password" in message
    assert "AWS_SECRET_ACCESS_KEY" in message  # the fix
    assert "hunter2" not in message


def test_missing_required_fields_are_listed() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "debug.yaml", [])
    message = str(err.value)
    for field in ("data.dataset_uri", "checkpoint.uri", "output.uri"):
        assert f"{field}: required field is missing" in message


def test_malformed_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_override({}, "train.epochs")


def test_config_hash_ignores_locations_and_guardrails_but_not_training_math() -> None:
    base = load_config(CONFIGS / "debug.yaml", REQUIRED)
    moved = load_config(
        CONFIGS / "debug.yaml",
        ["data.dataset_uri=s3://b/d", "checkpoint.uri=s3://b/c", "output.uri=s3://b/o", "train.max_steps=5"],
    )
    changed = load_config(CONFIGS / "debug.yaml", [*REQUIRED, "optimizer.lr=0.5"])
    assert base.config_hash() == moved.config_hash()
    assert base.config_hash() != changed.config_hash()
    assert len(base.config_hash()) == 16


def test_schema_has_a_description_for_every_field() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        for field, spec in definition.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"
    assert set(schema["properties"]) == set(TrainerConfig.model_fields)


def test_default_config_is_valid() -> None:
    cfg = load_config(CONFIGS / "default.yaml", REQUIRED)
    assert cfg.train.batch_size == 512
    assert cfg.early_stopping.monitor == "val_roc_auc"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.unknown=1", "train.unknown: unknown key"),
        ("optimizer.lr=-1", "optimizer.lr: Input should be greater than 0"),
    ],
)
def test_cli_exits_65_naming_the_field(override: str, field: str) -> None:
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(CONFIGS / "debug.yaml")]
    for item in [*REQUIRED, override]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 65
    assert field in proc.stderr


def test_cli_prints_the_schema() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "schema"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["title"] == "TrainerConfig"


def test_readme_config_table_is_the_generated_one() -> None:
    readme = (CONFIGS.parent / "README.md").read_text()
    table = markdown_table()
    assert table in readme, "training_image/README.md is stale: paste `python -m trainer config-table`"
    assert table.count("\n") + 1 == 2 + len(
        TrainerConfig.model_validate(
            {"data": {"dataset_uri": "x"}, "checkpoint": {"uri": "x"}, "output": {"uri": "x"}}
        ).flat()
    )


def test_a_new_factory_does_not_get_the_files_kwargs_for_the_old_one() -> None:
    default = CONFIGS / "default.yaml"
    where = ["data.dataset_uri=file:///d", "checkpoint.uri=file:///c", "output.uri=file:///o"]
    assert load_config(default, where).model.kwargs == {"hidden_sizes": [64, 32], "dropout": 0.1}
    swapped = load_config(default, [*where, "model.factory=my_pkg.models:build"])
    assert swapped.model.factory == "my_pkg.models:build" and swapped.model.kwargs == {}
    with_own = load_config(default, [*where, "model.factory=my_pkg.models:build", "model.kwargs.width=8"])
    assert with_own.model.kwargs == {"width": 8}
    same = load_config(default, [*where, "model.factory=trainer.model:mlp"])
    assert same.model.kwargs == {"hidden_sizes": [64, 32], "dropout": 0.1}


def test_the_production_config_has_no_fault_injection_section() -> None:
    from trainer.config import overrides_schema

    assert "faults" not in TrainerConfig.model_fields
    assert not [key for key in overrides_schema()["properties"] if key.startswith("faults")]
    assert "faults" not in json.dumps(overrides_schema())  # nor in the trigger form's unknown-key help
    with pytest.raises(ConfigError, match=r"faults: unknown key; allowed keys here: "):
        load_config(CONFIGS / "debug.yaml", [*REQUIRED, "faults.kill_at_step=3"])


def test_ddp_options_are_described_config_fields_offered_as_overrides() -> None:
    from trainer.config import overrides_schema

    properties = overrides_schema()["properties"]
    for key in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view", "bucket_cap_mb"):
        assert properties[f"distributed.{key}"]["description"].startswith("DDP: ")
    cfg = load_config(
        CONFIGS / "debug.yaml",
        [*REQUIRED, "distributed.find_unused_parameters=true", "distributed.bucket_cap_mb=50"],
    )
    assert cfg.distributed.find_unused_parameters is True and cfg.distributed.bucket_cap_mb == 50
    assert cfg.config_hash() == load_config(CONFIGS / "debug.yaml", REQUIRED).config_hash()
    with pytest.raises(ConfigError, match="distributed.bucket_cap_mb: Input should be greater than 0"):
        load_config(CONFIGS / "debug.yaml", [*REQUIRED, "distributed.bucket_cap_mb=0"])
