"""A model card per model version: what it was trained on, how it was checked, why it was (not) promoted.

Built from what the pipeline recorded, never typed by hand: the snapshot manifest (window, rows, label
rate, feature service and hash), the GX result and its Data Docs, the training run's config, seed, world
size and the curves the trainer logged as MLflow metrics, the governance decision (metrics with intervals,
slices, the comparison with the champion, every rule), the version's lineage tags, and the intended use
from the pipeline definition. Logged under the run's ``model_card/`` artifacts as ``card.json`` (the twin
the other two are rendered from), ``card.md`` and ``card.html`` (self-contained, every value escaped), and
linked from the version (tag ``model_card`` and its description).

:func:`publish` (the govern step) writes the card; :func:`add_event` appends an approval or promotion event
(kept across later publishes) and re-renders it.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctrain import layout, registry, storage

if TYPE_CHECKING:
    from ctrain.settings import Settings

CARD_DIR = "model_card"
CARD_JSON, CARD_MD, CARD_HTML = "card.json", "card.md", "card.html"
TAG = "model_card"
_CURVE_POINTS = 200  # per curve in the card (the full history stays in MLflow)


def publish(settings: Settings, model: str, version: str) -> dict[str, Any]:
    """Build the card of ``model`` v``version`` from its run and records, log it, link it; returns it."""
    client = registry.get_client(settings)
    mv = client.get_model_version(model, version)
    previous = _logged_card(client, mv.run_id)
    card = build(settings, client, mv)
    card["events"] = previous.get("events", []) if previous else []
    _log(client, settings, mv, card)
    return card


def add_event(settings: Settings, model: str, version: str, event: dict[str, Any]) -> dict[str, Any]:
    """Append ``event`` (e.g. ``{"action": "human_approve", "by": "human:alice", "at": ..., ...}``) to the
    card of ``model`` v``version``, re-render and re-log it; returns the card."""
    client = registry.get_client(settings)
    mv = client.get_model_version(model, version)
    card = _logged_card(client, mv.run_id) or build(settings, client, mv)
    card.setdefault("events", []).append(dict(event))
    _log(client, settings, mv, card)
    return card


def build(settings: Settings, client: Any, mv: Any) -> dict[str, Any]:
    """The card's JSON twin for model version ``mv``."""
    from ctrain.snapshot import read_manifest

    definition = settings.definition
    tags = dict(mv.tags)
    run = client.get_run(mv.run_id)
    run_tags, params = run.data.tags, run.data.params
    manifest = read_manifest(layout.dataset_uri(settings.resolved_object_root, tags["dataset_version"]), settings)
    report = storage.read_json(run_tags["gx_report_uri"], settings) if run_tags.get("gx_report_uri") else None
    decision = _decision(client, mv.run_id)
    return {
        "model": mv.name, "version": str(mv.version), "pipeline": definition.name, "owner": definition.owner,
        "intended_use": {"pipeline": definition.description, "model": definition.model.description,
                         "task": definition.task.type, "label": definition.events.label_column},
        "data": {"dataset_version": manifest["dataset_version"], "window": manifest["entity_window"],
                 "rows": manifest["rows"], "label_rate": manifest.get("label_rate"),
                 "splits": {s: {k: m.get(k) for k in ("rows", "label_rate", "start", "end")}
                            for s, m in manifest["splits"].items()},
                 "source_partitions": tags.get("source_partitions")},
        "features": {"service": manifest["feature_service"], "hash": manifest["feature_service_hash"],
                     "columns": manifest["feature_columns"]},
        "validation": {"result_id": run_tags.get("gx_result_id"),
                       "success": report.get("success") if isinstance(report, dict) else None,
                       "failed": report.get("failed", []) if isinstance(report, dict) else [],
                       "report": run_tags.get("gx_report_uri"), "data_docs": run_tags.get("gx_docs_uri")},
        "training": {"run_id": mv.run_id, "config_hash": tags.get("config_hash"), "seed": tags.get("seed"),
                     "world_size": params.get("world_size"), "config": dict(sorted(params.items())),
                     "curves": _curves(client, mv.run_id, run.data.metrics)},
        "evaluation": _evaluation(run.data.metrics, decision, definition.test_metrics),
        "decision": {k: decision.get(k) for k in ("approved", "policy_version", "policy_sha256", "grey_zone",
                                                  "reasons", "rules", "approval", "audit_uri")} if decision else None,
        "lineage": {k: tags.get(k) for k in sorted(tags) if not k.startswith("governance.") and k != TAG},
    }


def _decision(client: Any, run_id: str) -> dict[str, Any] | None:
    from ctrain.pipeline import DECISION_ARTIFACT

    return _artifact_json(client, run_id, DECISION_ARTIFACT)


def _logged_card(client: Any, run_id: str) -> dict[str, Any] | None:
    return _artifact_json(client, run_id, f"{CARD_DIR}/{CARD_JSON}")


def _artifact_json(client: Any, run_id: str, path: str) -> dict[str, Any] | None:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="ctrain-card-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        data = json.loads(Path(local).read_text())
    return data if isinstance(data, dict) else None


def _curves(client: Any, run_id: str, metrics: dict[str, float]) -> dict[str, list[list[float]]]:
    """Every metric the trainer logged at more than one step, as [step, value] pairs (thinned)."""
    curves = {}
    for key in sorted(metrics):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if len(history) > 1:
            stride = max(1, len(history) // _CURVE_POINTS)
            curves[key] = [[float(s), float(v)] for s, v in history[::stride]]
    return curves


def _evaluation(metrics: dict[str, float], decision: dict[str, Any] | None, names: list[str]) -> dict[str, Any]:
    rules = (decision or {}).get("rules", [])
    intervals = (decision or {}).get("metric_intervals", {})
    return {
        "metrics": {n: {"challenger": metrics.get(f"eval_{n}"), "champion": metrics.get(f"champion_{n}"),
                        "challenger_interval": intervals.get("challenger", {}).get(n),
                        "champion_interval": intervals.get("champion", {}).get(n)} for n in names},
        "champion_version": (decision or {}).get("champion_version"),
        "comparison": next((r for r in rules if r["name"] == "non_inferiority"), None),
        "slices": [r for r in rules if r["name"].startswith("slice:")],
        "model_bytes": metrics.get("eval_model_bytes"), "latency_p95_ms": metrics.get("eval_latency_p95_ms"),
    }


def _log(client: Any, settings: Settings, mv: Any, card: dict[str, Any]) -> None:
    """Log the three files and link the version (tag ``model_card``, and the description)."""
    for name, text in ((CARD_MD, render_markdown(card)), (CARD_HTML, render_html(card)),
                       (CARD_JSON, json.dumps(card, indent=2, sort_keys=True, default=str))):
        client.log_text(mv.run_id, text, f"{CARD_DIR}/{name}")
    uri = f"{client.get_run(mv.run_id).info.artifact_uri}/{CARD_DIR}/{CARD_HTML}"
    client.set_model_version_tag(mv.name, mv.version, TAG, uri)
    description = settings.definition.model.description
    client.update_model_version(mv.name, mv.version, description=f"{description}\n\nModel card: {uri}".strip())


# ---- rendering --------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1000 else f"{value:.4f}"
    return "" if value is None else str(value)


def _interval(i: dict[str, Any] | None) -> str:
    return f"[{i['low']:.4f}, {i['high']:.4f}] ({i['method']})" if i else ""


def _sections(card: dict[str, Any]) -> list[tuple[str, list[list[str]] | str]]:
    """(title, rows or text): the card's content, rendered alike by Markdown and HTML."""
    d, f, v, t, e = card["data"], card["features"], card["validation"], card["training"], card["evaluation"]
    decision = card.get("decision") or {}
    use = card["intended_use"]
    sections: list[tuple[str, list[list[str]] | str]] = [
        ("Intended use", f"{use['pipeline']} {use['model']} Task: {use['task']} of `{use['label']}`. "
                         f"Owner: {card['owner']}."),
        ("Data", [["dataset version", d["dataset_version"]], ["window", f"{d['window']['start']} .. {d['window']['end']}"],
                  ["rows", _fmt(d["rows"])], ["label rate", _fmt(d["label_rate"])],
                  *[[f"{s} split", f"{m['rows']} rows, label rate {_fmt(m['label_rate'])}, {m['start']} .. {m['end']}"]
                    for s, m in d["splits"].items()],
                  ["source partitions", _fmt(d["source_partitions"])]]),
        ("Features", [["feature service", f["service"]], ["hash", f["hash"]], ["columns", ", ".join(f["columns"])]]),
        ("Validation", [["GX result", _fmt(v["result_id"])], ["success", _fmt(v["success"])],
                        ["failed expectations", ", ".join(v["failed"]) or "none"],
                        ["report", _fmt(v["report"])], ["Data Docs", _fmt(v["data_docs"])]]),
        ("Training", [["MLflow run", t["run_id"]], ["config hash", _fmt(t["config_hash"])], ["seed", _fmt(t["seed"])],
                      ["world size", _fmt(t["world_size"])],
                      *[[f"curve {k}", f"{len(c)} points, first {c[0][1]:.4f}, last {c[-1][1]:.4f}"]
                        for k, c in t["curves"].items()]]),
        ("Configuration", [[k, _fmt(val)] for k, val in t["config"].items()]),
        ("Evaluation (test split)", [["metric", "challenger", "interval", "champion", "interval"],
                                     *[[n, _fmt(m["challenger"]), _interval(m["challenger_interval"]),
                                        _fmt(m["champion"]), _interval(m["champion_interval"])]
                                       for n, m in e["metrics"].items()],
                                     ["model bytes", _fmt(e["model_bytes"]), "", "", ""],
                                     ["latency p95 ms", _fmt(e["latency_p95_ms"]), "", "", ""]]),
        ("Comparison with the champion", e["comparison"]["reason"] if e["comparison"] else "no comparison"),
        ("Slices", [["rule", "segment", "rows", "challenger", "champion"],
                    *[[r["name"], s["segment"], str(s["rows"]), _fmt(s.get("challenger")), _fmt(s.get("champion"))]
                      for r in e["slices"] for s in r["numbers"].get("segments", [])]]),
        ("Decision", [["approved", _fmt(decision.get("approved"))], ["policy", _fmt(decision.get("policy_version"))],
                      ["policy sha256", _fmt(decision.get("policy_sha256"))],
                      ["grey zone", _fmt(decision.get("grey_zone"))], ["audit", _fmt(decision.get("audit_uri"))],
                      *[["pass" if r["passed"] else "FAIL", f"{r['name']}: {r['reason']}"]
                        for r in decision.get("rules") or []]]),
        ("Approvals and promotions", [["action", "by", "at", "details"],
                                      *[[_fmt(ev.get("action")), _fmt(ev.get("by") or ev.get("decided_by")),
                                         _fmt(ev.get("at")), json.dumps({k: x for k, x in ev.items()
                                                                         if k not in ("action", "by", "at")},
                                                                        default=str)]
                                        for ev in card.get("events", [])]]),
        ("Lineage", [[k, _fmt(val)] for k, val in card["lineage"].items()]),
    ]
    return sections


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown; values are HTML-escaped too (Markdown viewers render raw HTML) and pipes escaped."""
    def cell(value: str) -> str:
        return html.escape(value, quote=False).replace("|", "\\|").replace("\n", " ")

    lines = [f"# Model card: {card['model']} v{card['version']}", ""]
    for title, body in _sections(card):
        lines += [f"## {title}", ""]
        if isinstance(body, str):
            lines.append(html.escape(body, quote=False))
        elif body:
            header = body[0] if len(body[0]) > 2 else ["", ""]
            rows = body[1:] if len(body[0]) > 2 else body
            lines += ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def render_html(card: dict[str, Any]) -> str:
    """One self-contained page (inline style and curves as inline SVG, no scripts); every value escaped."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Model card: {esc(card['model'])} v{esc(card['version'])}</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}</style></head><body>",
             f"<h1>Model card: {esc(card['model'])} v{esc(card['version'])}</h1>"]
    for title, body in _sections(card):
        parts.append(f"<h2>{esc(title)}</h2>")
        if isinstance(body, str):
            parts.append(f"<p>{esc(body)}</p>")
            continue
        header = body[0] if body and len(body[0]) > 2 else None
        parts.append("<table>")
        if header:
            parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in body[1:] if header else body:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        if title == "Training":
            parts += [_svg(name, points) for name, points in card["training"]["curves"].items()]
    parts.append("</body></html>")
    return "\n".join(parts)


def _svg(name: str, points: list[list[float]], width: int = 360, height: int = 120) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx, sy = (width - 10) / ((x1 - x0) or 1), (height - 20) / ((y1 - y0) or 1)
    path = " ".join(f"{5 + (x - x0) * sx:.1f},{height - 5 - (y - y0) * sy:.1f}" for x, y in zip(xs, ys, strict=True))
    return (f"<figure><svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
            f"<polyline fill='none' stroke='#036' points='{path}'/></svg>"
            f"<figcaption>{html.escape(name)}: {y0:.4g} .. {y1:.4g}</figcaption></figure>")
