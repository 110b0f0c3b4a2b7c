"""The model card of a version: built from what the pipeline recorded (real steps, MLflow on SQLite), logged
as Markdown, self-contained escaped HTML and a JSON twin, linked from the version; events append to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the gov_two_versions fixture: two 2-process trainings (shared with test_governance)


def _artifact(client, run_id: str, path: str, dst: Path) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst))).read_text()


@pytest.fixture
def card_of_v2(gov_two_versions, tmp_path):
    from ctrain import registry

    settings, _, second = gov_two_versions
    client = registry.get_client(settings)
    mv = client.get_model_version(settings.model_name, second["registration"]["version"])
    texts = {name: _artifact(client, mv.run_id, f"model_card/{name}", tmp_path / name)
             for name in ("card.json", "card.md", "card.html")}
    return settings, second, client, mv, texts


def test_the_card_holds_what_the_run_recorded(card_of_v2, tmp_path):
    from ctrain import layout
    from ctrain.snapshot import read_manifest

    settings, second, client, mv, texts = card_of_v2
    card = json.loads(texts["card.json"])
    manifest = read_manifest(layout.dataset_uri(settings.resolved_object_root, mv.tags["dataset_version"]))
    assert card["data"]["window"] == manifest["entity_window"] and card["data"]["rows"] == manifest["rows"]
    assert card["data"]["label_rate"] == manifest["label_rate"]
    assert card["data"]["splits"]["test"]["rows"] == manifest["splits"]["test"]["rows"]
    assert card["features"] == {"service": "fraud_model_v1", "hash": mv.tags["feature_service_hash"],
                                "columns": manifest["feature_columns"]}
    validation = second["validation"]
    assert card["validation"]["success"] is True and card["validation"]["data_docs"] == validation["docs_uri"]
    assert card["validation"]["result_id"] == validation["result_id"]
    training = card["training"]
    assert training["seed"] == "0" and training["world_size"] == "2" and training["config"]["optimizer.lr"] == "0.001"
    history = client.get_metric_history(mv.run_id, "val_loss")
    assert training["curves"]["val_loss"] == [[float(m.step), m.value] for m in sorted(history, key=lambda m: m.step)]
    decision = json.loads(_artifact(client, mv.run_id, "governance/decision.json", tmp_path / "d"))
    assert card["decision"]["rules"] == decision["rules"] and card["decision"]["approved"] == decision["approved"]
    metrics = card["evaluation"]["metrics"]["test_roc_auc"]
    assert metrics["challenger"] == pytest.approx(second["evaluation"]["challenger"]["test_roc_auc"])
    assert metrics["champion"] == pytest.approx(second["evaluation"]["champion"]["test_roc_auc"])
    assert metrics["challenger_interval"]["low"] < metrics["challenger"] < metrics["challenger_interval"]["high"]
    assert card["evaluation"]["comparison"]["name"] == "non_inferiority"
    assert card["evaluation"]["slices"][0]["name"] == "slice:amount"
    assert card["evaluation"]["champion_version"] == "1"
    lineage = {k: v for k, v in mv.tags.items() if not k.startswith("governance.") and k != "model_card"}
    assert card["lineage"] == lineage
    assert card["intended_use"]["pipeline"] == settings.definition.description


def test_the_version_links_its_card_and_markdown_and_html_render_it(card_of_v2):
    _, _, client, mv, texts = card_of_v2
    run = client.get_run(mv.run_id)
    link = f"{run.info.artifact_uri}/model_card/card.html"
    assert mv.tags["model_card"] == link and f"Model card: {link}" in mv.description
    card = json.loads(texts["card.json"])
    for text in (texts["card.md"], texts["card.html"]):
        assert f"Model card: fraud_detector v{mv.version}" in text
        assert card["data"]["dataset_version"] in text and card["features"]["hash"] in text
        assert card["validation"]["data_docs"] in text
        assert "non_inferiority" in text and "delong" in text
    html = texts["card.html"]
    assert "<svg" in html  # the curves, inline
    for external in ("<script", "<link", " src=", " href="):  # self-contained: nothing to fetch or run
        assert external not in html


def test_html_escapes_every_value(card_of_v2):
    from ctrain.modelcard import render_html, render_markdown

    card = json.loads(card_of_v2[4]["card.json"])
    card["intended_use"]["model"] = "<script>alert(1)</script> | x"
    card["lineage"]["git_sha"] = "<img src=x onerror=alert(1)>"
    html = render_html(card)
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    markdown = render_markdown(card)
    assert "<script" not in markdown and "<img" not in markdown  # Markdown viewers render raw HTML
    assert "&lt;script&gt;alert(1)&lt;/script&gt; | x" in markdown
    assert "| git_sha | &lt;img src=x onerror=alert(1)&gt; |" in markdown


def test_events_append_and_survive_a_later_publish(gov_two_versions, tmp_path):
    from ctrain import modelcard, registry

    settings, first, _ = gov_two_versions
    version = first["registration"]["version"]
    event = {"action": "human_approve", "by": "human:alice", "at": 1767225600.0, "comment": "looks right"}
    modelcard.add_event(settings, settings.model_name, version, event)
    card = modelcard.publish(settings, settings.model_name, version)  # e.g. a rerun of govern
    assert card["events"] == [event]
    client = registry.get_client(settings)
    run_id = client.get_model_version(settings.model_name, version).run_id
    markdown = _artifact(client, run_id, "model_card/card.md", tmp_path / "md")
    assert '| human_approve | human:alice | 1767225600 | {"comment": "looks right"} |' in markdown
    assert json.loads(_artifact(client, run_id, "model_card/card.json", tmp_path / "json"))["events"] == [event]
