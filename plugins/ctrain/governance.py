"""Promotion policy as code: may this challenger replace the champion?

A policy is a small, versioned set of rules over the challenger's and champion's test metrics, both
computed on the same test split by the evaluate task. The decision lists every rule it checked, so the
audit record says exactly why a model was or was not promoted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Policy:
    """Promotion rules. ``version`` goes into every audit record; bump it when a rule changes."""

    version: str = "fraud-v1"
    min_test_roc_auc: float = 0.80
    # The challenger may trail the champion by at most this much ROC AUC on the same test data.
    max_regression: float = 0.005
    metric: str = "test_roc_auc"


@dataclass(frozen=True)
class Decision:
    approved: bool
    policy_version: str
    reasons: list[str] = field(default_factory=list)
    metrics_compared: dict[str, float | None] = field(default_factory=dict)


def decide(policy: Policy, challenger: dict[str, float], champion: dict[str, float] | None) -> Decision:
    """Check ``challenger`` (and ``champion``, when there is one) metrics against ``policy``."""
    reasons: list[str] = []
    ok = True
    score = challenger.get(policy.metric)
    if score is None:
        return Decision(False, policy.version, [f"challenger has no {policy.metric}"], {})
    if score >= policy.min_test_roc_auc:
        reasons.append(f"{policy.metric}={score:.4f} >= floor {policy.min_test_roc_auc:.4f}")
    else:
        ok = False
        reasons.append(f"{policy.metric}={score:.4f} below floor {policy.min_test_roc_auc:.4f}")
    champion_score = champion.get(policy.metric) if champion else None
    if champion_score is None:
        reasons.append("no champion yet: first model is judged on the floor alone")
    elif score >= champion_score - policy.max_regression:
        reasons.append(f"within {policy.max_regression} of champion's {champion_score:.4f} on the same test split")
    else:
        ok = False
        reasons.append(
            f"regresses vs champion: {score:.4f} < {champion_score:.4f} - {policy.max_regression}"
        )
    return Decision(ok, policy.version, reasons,
                    {"challenger": score, "champion": champion_score})
