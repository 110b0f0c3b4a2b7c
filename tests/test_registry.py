"""Registry against a real MLflow (SQLite store): idempotent runs and versions, compare-and-set promotion."""

from __future__ import annotations

import json

import fsspec
import pytest

from ctrain import registry
from support import pipeline_settings


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")  # one MLflow DB per module: creating one costs seconds


@pytest.fixture
def settings(home, request):
    # One registered model per test, in one MLflow DB: the model name is the definition's.
    test = request.node.name[:40]
    return pipeline_settings(home, pipelines=home / "pipelines" / test, model__name=f"m_{test}",
                             model__description="registry test model")


@pytest.fixture
def client(settings):
    return registry.get_client(settings)


def _model_run(client, settings, key: str) -> tuple[str, str]:
    """A run with a logged model, as the trainer leaves it, and the model's ``models:/m-<id>`` URI. The
    registry never opens the model, so an empty logged model stands in for the exported network (the
    end-to-end test loads real ones)."""
    run = registry.training_run_for(client, settings, key, tags={"dataset_version": "d1"})
    experiment_id = client.get_run(run.run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name="model", source_run_id=run.run_id)
    client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run.run_id)
    return run.run_id, f"models:/{model.model_id}"


def _record(version: str, previous: str | None, model: str = "m") -> registry.AuditRecord:
    return registry.AuditRecord(model=model, version=version, action="promote", decided_by="policy:t",
                                policy_version="t", previous_champion=previous, metrics_compared={"x": 1.0},
                                reasons=["ok"], dag_run_id="r", at=1.0 + int(version))


def test_training_run_is_reused_for_the_same_key(client, settings):
    first = registry.training_run_for(client, settings, settings.model_name + "key-1", tags={"a": "b"})
    again = registry.training_run_for(client, settings, settings.model_name + "key-1", tags={"a": "b"})
    other = registry.training_run_for(client, settings, settings.model_name + "key-2", tags={})
    assert first.created and not again.created
    assert again.run_id == first.run_id != other.run_id
    assert client.get_run(first.run_id).data.tags[registry.RUN_KEY_TAG] == settings.model_name + "key-1"


def test_register_is_idempotent_and_promotion_keeps_previous(client, settings):
    run1, uri1 = _model_run(client, settings, settings.model_name + "k1")
    v1 = registry.register_challenger(client, settings, run1, uri1, {"dataset_version": "d1"})
    assert registry.register_challenger(client, settings, run1, uri1, {"dataset_version": "d1"}) == v1
    assert len(client.search_model_versions(f"name = '{settings.model_name}'")) == 1
    assert client.get_model_version(settings.model_name, v1).tags["dataset_version"] == "d1"
    assert registry.alias_version(client, settings.model_name, "challenger") == v1
    assert client.get_registered_model(settings.model_name).description == "registry test model"

    audit1 = registry.promote(client, settings, v1, None, _record(v1, None, settings.model_name))
    run2, uri2 = _model_run(client, settings, settings.model_name + "k2")
    v2 = registry.register_challenger(client, settings, run2, uri2, {})
    registry.promote(client, settings, v2, v1, _record(v2, v1, settings.model_name))
    assert registry.alias_version(client, settings.model_name, "champion") == v2
    assert registry.alias_version(client, settings.model_name, "previous") == v1
    with fsspec.open(audit1) as fh:
        assert json.load(fh)["version"] == v1
    assert client.get_model_version(settings.model_name, v2).tags["promoted_by"] == "policy:t"


def test_promotion_refuses_when_champion_moved(client, settings):
    run1, uri1 = _model_run(client, settings, settings.model_name + "k1")
    v1 = registry.register_challenger(client, settings, run1, uri1, {})
    registry.promote(client, settings, v1, None, _record(v1, None, settings.model_name))
    run2, uri2 = _model_run(client, settings, settings.model_name + "k2")
    v2 = registry.register_challenger(client, settings, run2, uri2, {})
    # v2 was evaluated against "no champion", but v1 became champion meanwhile.
    with pytest.raises(registry.PromotionConflict, match="re-run evaluate"):
        registry.promote(client, settings, v2, None, _record(v2, None, settings.model_name))
    assert registry.alias_version(client, settings.model_name, "champion") == v1
