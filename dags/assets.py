"""Every Asset the ctrain DAGs produce or consume, declared once.

One Asset per name a pipeline definition lands (``events.table``: its arrival DAG emits it) or listens
to (``schedule.assets``: its training DAG runs on it), so producer and consumer share the object. Also
the pipeline definitions themselves, loaded once per parse (pydantic and YAML only: cheap).
"""

from __future__ import annotations

from airflow.sdk import Asset

from ctrain.definition import load_all
from ctrain.settings import get_settings

DEFINITIONS = load_all(get_settings().pipelines_dir)

ASSETS = {
    name: Asset(name=name, uri=f"file:///ctrain/{name}", group="ctrain")
    for name in sorted({n for d in DEFINITIONS.values() for n in (d.events.table, *d.schedule.assets)})
}
