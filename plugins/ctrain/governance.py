"""Promotion policy as code: may this challenger replace the champion?

A policy is a small, versioned set of rules over the primary test metric of the challenger and the
champion, both computed on the same test split by the evaluate task. The rules and the metric come
from the pipeline definition (``governance`` and ``metrics``), so "better" means higher or lower as the
metric does. The decision lists every rule it checked, so the audit record says exactly why a model
was or was not promoted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctrain.definition import Direction, PipelineDefinition


@dataclass(frozen=True)
class Policy:
    """Promotion rules. ``version`` goes into every audit record; bump it when a rule changes."""

    version: str
    metric: str  # the primary test metric, e.g. test_<metrics.primary>
    direction: Direction  # "higher" or "lower" is better
    floor: float  # the metric must be at least this (higher) or at most this (lower)
    # The challenger may trail the champion by at most this much on the same test data.
    max_regression: float = 0.0

    @classmethod
    def from_definition(cls, definition: PipelineDefinition, floor: float | None = None) -> Policy:
        """The definition's policy; ``floor`` (e.g. a trigger's Param) replaces its floor when given."""
        rules = definition.governance
        return cls(version=rules.version, metric=definition.primary_test_metric,
                   direction=definition.metrics.direction, floor=rules.floor if floor is None else floor,
                   max_regression=rules.max_regression)

    def at_least_as_good(self, score: float, bound: float) -> bool:
        return score >= bound if self.direction == "higher" else score <= bound


@dataclass(frozen=True)
class Decision:
    approved: bool
    policy_version: str
    reasons: list[str] = field(default_factory=list)
    metrics_compared: dict[str, str | float | None] = field(default_factory=dict)


def decide(policy: Policy, challenger: dict[str, float], champion: dict[str, float] | None) -> Decision:
    """Check ``challenger`` (and ``champion``, when there is one) metrics against ``policy``."""
    name = policy.metric
    score = challenger.get(name)
    if score is None:
        return Decision(False, policy.version, [f"challenger has no {name}"], {})
    higher = policy.direction == "higher"
    reasons: list[str] = []
    ok = policy.at_least_as_good(score, policy.floor)
    relation = (">=" if higher else "<=") if ok else ("below" if higher else "above")
    reasons.append(f"{name}={score:.4f} {relation} floor {policy.floor:.4f} ({policy.direction} is better)")
    champion_score = champion.get(name) if champion else None
    if champion_score is None:
        reasons.append("no champion yet: first model is judged on the floor alone")
    else:
        # The worst score still accepted: the champion's, moved by max_regression in the bad direction.
        bound = champion_score - policy.max_regression if higher else champion_score + policy.max_regression
        if policy.at_least_as_good(score, bound):
            reasons.append(f"within {policy.max_regression} of champion's {champion_score:.4f} on the same test split")
        else:
            ok = False
            sign = "-" if higher else "+"
            reasons.append(f"regresses vs champion: {name}={score:.4f} is worse than "
                           f"{champion_score:.4f} {sign} {policy.max_regression}")
    return Decision(ok, policy.version, reasons, {"metric": name, "challenger": score, "champion": champion_score})
