"""What a trigger may ask of the trainer: the ``trainer_overrides`` Param narrowed by the operator's settings.

The trainer generates the schema of its overrides (``dags/trainer_overrides.schema.json``: the type,
bounds and description of every key). The settings narrow it: ``model.factory`` may only name modules
under ``CTRAIN_MODEL_FACTORY_PREFIXES``, and what can exhaust the machine has a ceiling
(:data:`CEILINGS`). The DAG puts :func:`trainer_overrides_schema` on its Param when it is parsed, so
Airflow refuses such a trigger (HTTP 400 naming the key, the rule and the setting); the train task runs
:func:`check_trainer_overrides` again with the worker's settings, and :func:`pipeline_limits` gives the
overrides the pipeline always adds, so the trainer enforces the same rules itself.

Cheap to import (no heavy libraries): the DAG file imports it at parse time.
"""

from __future__ import annotations

import copy
import json
import re
from typing import TYPE_CHECKING, Any

from ctrain.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ctrain.settings import Settings

# Override key -> the setting that caps it.
CEILINGS = {
    "train.epochs": "max_epochs",
    "train.max_steps": "max_steps",
    "train.batch_size": "max_batch_size",
    "train.max_wall_clock_s": "max_train_wall_clock_s",
}
FACTORY_KEY = "model.factory"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def setting_name(field: str) -> str:
    """The environment variable of a settings field (``max_epochs`` -> ``CTRAIN_MAX_EPOCHS``)."""
    return f"CTRAIN_{field.upper()}"


def factory_pattern(prefixes: tuple[str, ...]) -> str:
    """``module:function`` with the module equal to, or inside, one of ``prefixes``."""
    modules = "|".join(re.escape(p) for p in prefixes)
    return rf"^(?:{modules})(?:\.{_NAME})*:{_NAME}$"


def trainer_overrides_schema(base: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The generated overrides schema with the factory allow-list and the ceilings of ``settings``.

    Each narrowed key's description says the limit and the setting that moves it: Airflow's refusal
    prints the failing key's schema node, so the message carries the fix.
    """
    schema = copy.deepcopy(dict(base))
    props = schema["properties"]
    prefixes = settings.model_factory_prefixes
    factory = props[FACTORY_KEY]
    factory["pattern"] = factory_pattern(prefixes)
    factory["description"] = (
        f"{factory.get('description', '')} From a trigger only modules under {', '.join(prefixes)} "
        f"({setting_name('model_factory_prefixes')}, an operator setting)."
    ).strip()
    for key, field in CEILINGS.items():
        limit = getattr(settings, field)
        props[key] = _capped(props[key], limit, f"At most {_number(limit)} ({setting_name(field)}).")
    return schema


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _capped(node: dict[str, Any], limit: float, note: str) -> dict[str, Any]:
    """``node`` with ``maximum: limit`` on one level: an ``anyOf`` of a number and null becomes a type list,
    so the refusal shows this node (with its description), not one bare branch of it."""
    branches = node.get("anyOf", [node])
    capped = {k: v for k, v in node.items() if k not in ("anyOf", "type")}
    types: list[str] = []
    for branch in branches:
        kind = branch.get("type")
        types += kind if isinstance(kind, list) else [kind]
        capped.update({k: v for k, v in branch.items() if k != "type"})
    capped["type"] = types if len(types) > 1 else types[0]
    capped["maximum"] = limit
    capped["description"] = f"{node.get('description', '')} {note}".strip()
    return capped


def check_trainer_overrides(settings: Settings, overrides: Mapping[str, Any]) -> None:
    """Refuse (ConfigError) overrides outside the factory allow-list or above a ceiling of ``settings``.

    The same rules as the Param's schema, checked again where the task runs: the schema holds the
    settings of the process that parsed the DAG, which need not be the worker's.
    """
    problems = []
    factory = overrides.get(FACTORY_KEY)
    if factory is not None and not re.fullmatch(factory_pattern(settings.model_factory_prefixes), str(factory)):
        problems.append(
            f"{FACTORY_KEY}={factory!r}: only factories under {', '.join(settings.model_factory_prefixes)} may be "
            f"named from a trigger; the operator adds a package to {setting_name('model_factory_prefixes')}"
        )
    for key, field in CEILINGS.items():
        value = overrides.get(key)
        limit = getattr(settings, field)
        if isinstance(value, int | float) and value > limit:
            problems.append(f"{key}={value!r} is above the ceiling {_number(limit)} ({setting_name(field)}); ask for less")
    if problems:
        raise ConfigError("Param trainer_overrides refused: " + "; ".join(problems))


def pipeline_limits(settings: Settings, overrides: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, str]:
    """The overrides the pipeline always adds (as ``--set`` values), so the trainer enforces the limits too.

    The allow-list goes to ``model.factory_prefixes``. The step and wall-clock guardrails are what the
    trigger (else the trainer config file ``config``) asked for when that is less than the ceiling,
    else the ceiling: no run is unbounded.
    """
    def at_most(key: str, field: str) -> float:
        section, _, name = key.partition(".")
        asked = overrides.get(key, (config.get(section) or {}).get(name))
        limit = getattr(settings, field)
        return limit if asked is None else min(asked, limit)

    return {
        "model.factory_prefixes": json.dumps(list(settings.model_factory_prefixes)),
        "train.max_steps": json.dumps(int(at_most("train.max_steps", "max_steps"))),
        "train.max_wall_clock_s": json.dumps(at_most("train.max_wall_clock_s", "max_train_wall_clock_s")),
    }
