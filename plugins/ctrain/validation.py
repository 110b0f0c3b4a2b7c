"""The Great Expectations gate on a dataset snapshot.

``validate_snapshot(snapshot_uri, report_root)`` runs an expectation suite defined here, in code, on the
snapshot (GX 1.x, ephemeral context, pandas data source; nothing is read from or written to a
``gx/`` folder), then writes two reports under ``{report_root}/validations/{dataset_version}/{result_id}/``:

- ``result.json``: the full GX validation results plus a summary (success, failed expectations, stats)
- ``data_docs/index.html``: GX Data Docs for this run (static HTML, works from a file or a bucket)

The suites (thresholds in :class:`SuiteConfig`, made from the pipeline definition's ``validation`` and
``task`` by :func:`suite_config`; column names from the snapshot's manifest):

- ``ctrain_snapshot`` on all rows: exact column list and dtypes (the trainer's contract: ids and entity
  keys int64, features float64, the label int64 for classification and float64 for regression), no nulls
  in ids, time, features and label, value ranges per feature, the label's values (binary: {0, 1};
  multiclass: 0..num_classes-1; regression: within ``target_range``), minimum row count, unique id and
  unique (entity keys, event time).
- ``ctrain_split`` on each of train/val/test: minimum rows and (binary) label rate bounds, so a split that
  came out empty or label-less fails even when the total looks fine.
- ``ctrain_drift`` (only with ``reference_uri``, normally the current champion's training snapshot) on the
  newest split (test: the most recent days): KL divergence of every feature and of the label from the
  reference's train split, with GX's ``expect_column_kl_divergence_to_be_less_than`` (features and a
  regression target over quantile bins; a binary label's rate or a multiclass label's class shares as
  categories). This is the poisoning guard: shifted feature sources or flipped labels in newly landed days
  move these distributions. Shifts too small for it are left to governance on the holdout metrics.
- freshness (``SuiteConfig.max_event_age``): the newest event is recent enough.

A failed gate is not an exception here: the caller decides. ``report.raise_for_failure()`` raises
:class:`ctrain.errors.ValidationFailed` with the failed expectations and the report location.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ctrain.errors import ValidationFailed

if TYPE_CHECKING:
    import pandas as pd

    from ctrain.definition import PipelineDefinition, Range
    from ctrain.settings import Settings

log = logging.getLogger(__name__)

SNAPSHOT_SUITE = "ctrain_snapshot"
SPLIT_SUITE = "ctrain_split"
DRIFT_SUITE = "ctrain_drift"

Bounds = tuple[float | None, float | None]


@dataclass(frozen=True)
class SuiteConfig:
    """Thresholds of the gate; :func:`suite_config` makes one from a pipeline definition."""

    task: Literal["binary", "multiclass", "regression"] = "binary"
    num_classes: int | None = None  # multiclass: labels are 0..num_classes-1
    min_rows: int = 1000
    min_rows_per_split: int = 100
    # binary: bounds of each split's positive rate; regression: bounds of every target value (None: off).
    label_rate: Bounds | None = None
    target_range: Bounds | None = None
    # Plausible range per feature; a value outside is a broken upstream job, not a rare entity.
    feature_ranges: dict[str, Bounds] = field(default_factory=dict)
    # Freshness: the newest event must be at most this old at ``freshness_at`` (default: now). Off unless
    # set: the pipeline sets it from the run's date.
    max_event_age: timedelta | None = None
    freshness_at: datetime | None = None
    # Drift vs the reference (champion's training data): KL divergence of the newest split's distribution
    # from the reference train split's, per feature (``drift_bins`` quantile bins) and for the label.
    max_feature_kl: float = 0.15
    max_label_kl: float = 0.03
    drift_bins: int = 10

    @property
    def classes(self) -> list[int] | None:
        """The label's allowed values for classification (None for regression)."""
        if self.task == "regression":
            return None
        return list(range(self.num_classes if self.task == "multiclass" and self.num_classes else 2))


def suite_config(definition: PipelineDefinition, **overrides: Any) -> SuiteConfig:
    """The gate's thresholds for a pipeline: its ``validation`` section and its task (``overrides``, e.g.
    ``max_event_age``, replace single fields)."""
    v = definition.validation

    def bounds(r: Range | None) -> Bounds | None:
        return None if r is None else (r.min, r.max)

    return replace(SuiteConfig(
        task=definition.task.type,
        num_classes=definition.task.num_classes,
        min_rows=v.min_rows,
        min_rows_per_split=v.min_rows_per_split,
        label_rate=bounds(v.label_rate),
        target_range=bounds(v.target_range),
        feature_ranges={name: (r.min, r.max) for name, r in v.feature_ranges.items()},
        max_feature_kl=v.drift.max_feature_kl,
        max_label_kl=v.drift.max_label_kl,
        drift_bins=v.drift.bins,
    ), **overrides)


@dataclass
class ValidationReport:
    """Outcome of one gate run. ``failed`` holds one human-readable line per failed expectation."""

    success: bool
    dataset_version: str
    result_id: str
    failed: list[str]
    statistics: dict[str, Any]
    report_uri: str
    docs_uri: str

    def raise_for_failure(self) -> None:
        """Raise ValidationFailed (listing the failed expectations and the report) unless successful."""
        if not self.success:
            raise ValidationFailed(self.dataset_version, self.failed, self.report_uri)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for XCom, MLflow tags and logs)."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------------


def snapshot_expectations(manifest: dict[str, Any], cfg: SuiteConfig) -> list[Any]:
    """The ``ctrain_snapshot`` expectations for a snapshot with this manifest and these pandas dtypes."""
    import great_expectations.expectations as gxe

    features = manifest["feature_columns"]
    id_col, label, ts = manifest["id_column"], manifest["label_column"], manifest["timestamp_column"]
    keys = manifest["entity_columns"]
    columns = [id_col, *keys, ts, *features, label]
    exps: list[Any] = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=columns),
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
    ]
    label_type = "float64" if cfg.task == "regression" else "int64"
    expected_types = {id_col: "int64", label: label_type, **{k: "int64" for k in keys},
                      **{f: "float64" for f in features}}
    for col, type_ in expected_types.items():
        exps.append(gxe.ExpectColumnValuesToBeOfType(column=col, type_=type_))
    # pandas reports a tz-aware datetime column's type as Timestamp and a naive one as datetime64, so
    # "Timestamp" is how GX says "timezone-aware" (the builder always writes UTC).
    exps.append(gxe.ExpectColumnValuesToBeOfType(column=ts, type_="Timestamp"))
    for col in columns:
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
    for col in features:
        lo, hi = cfg.feature_ranges.get(col, (None, None))
        if lo is not None or hi is not None:
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi))
    # A binary label's rate bounds are checked per split (ctrain_split); they imply the same bounds on the
    # whole snapshot (a weighted mean of the splits), so the snapshot suite does not repeat them.
    if cfg.classes is not None:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column=label, value_set=cfg.classes))
    elif cfg.target_range is not None:
        lo, hi = cfg.target_range
        exps.append(gxe.ExpectColumnValuesToBeBetween(column=label, min_value=lo, max_value=hi))
    exps += [
        gxe.ExpectColumnValuesToBeUnique(column=id_col),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=[*keys, ts]),
    ]
    if cfg.max_event_age is not None:
        at = cfg.freshness_at or datetime.now(UTC)
        exps.append(gxe.ExpectColumnMaxToBeBetween(column=ts, min_value=at - cfg.max_event_age))
    return exps


def split_expectations(manifest: dict[str, Any], cfg: SuiteConfig) -> list[Any]:
    """The ``ctrain_split`` expectations, run on each split separately."""
    import great_expectations.expectations as gxe

    exps: list[Any] = [gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows_per_split)]
    if cfg.task == "binary" and cfg.label_rate is not None:
        lo, hi = cfg.label_rate
        exps.append(gxe.ExpectColumnMeanToBeBetween(column=manifest["label_column"], min_value=lo, max_value=hi))
    return exps


def _continuous_partition(values: Any, bins: int) -> dict[str, Any]:
    """GX partition object from reference values: quantile bins, the outer two open-ended, smoothed weights.

    Open outer bins (edges at +-1e15, as in the usual PSI recipe) keep a new maximum or minimum in the
    first/last bin rather than in a near-empty tail; smoothing keeps the divergence finite when new data
    lands in a bin the reference left empty. Mass that moved still counts against the threshold.
    """
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    inner = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate([[-1e15], inner, [1e15]])
    counts, _ = np.histogram(v, bins=edges)
    tail = 1e-4
    weights = (counts + 0.5) / (counts + 0.5).sum() * (1 - 2 * tail)
    return {"bins": edges.tolist(), "weights": weights.tolist(), "tail_weights": [tail, tail]}


def drift_expectations(manifest: dict[str, Any], reference: pd.DataFrame, cfg: SuiteConfig) -> list[Any]:
    """The ``ctrain_drift`` expectations: newest data vs the reference frame (the champion's train split)."""
    import great_expectations.expectations as gxe

    label = manifest["label_column"]
    exps: list[Any] = [
        gxe.ExpectColumnKLDivergenceToBeLessThan(
            column=col, partition_object=_continuous_partition(reference[col], cfg.drift_bins),
            threshold=cfg.max_feature_kl,
        )
        for col in manifest["feature_columns"]
        if col in reference.columns
    ]
    if cfg.classes is None:  # a regression target: binned like a feature
        partition = _continuous_partition(reference[label], cfg.drift_bins)
    else:  # class shares; every class keeps some weight, so the divergence stays finite
        counts = reference[label].value_counts().reindex(cfg.classes, fill_value=0).to_numpy(dtype=float)
        shares = [min(max(c / max(counts.sum(), 1.0), 1e-4), 1 - 1e-4) for c in counts]
        partition = {"values": cfg.classes, "weights": [w / sum(shares) for w in shares]}
    exps.append(gxe.ExpectColumnKLDivergenceToBeLessThan(
        column=label, partition_object=partition, threshold=cfg.max_label_kl,
    ))
    return exps


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _describe(batch: str, er: Any) -> str:
    """One line per failed expectation: which check, on which column, what was seen."""
    cfg = er.expectation_config
    # Partition objects and value sets can be long; the report JSON has them in full.
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format", "partition_object")}
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    res = er.result or {}
    if er.exception_info and er.exception_info.get("raised_exception"):
        seen = f"error: {er.exception_info.get('exception_message')}"
    elif "unexpected_count" in res and res.get("element_count") is not None:
        pct = res.get("unexpected_percent")
        sample = (res.get("partial_unexpected_list") or [])[:3]
        sample = [v for v in sample if v is not None and v == v]  # NaN != NaN: nulls say nothing
        seen = f"{res['unexpected_count']} of {res['element_count']} rows unexpected"
        if pct is not None:
            seen += f" ({pct:.2f}%)"
        if sample:
            seen += f", e.g. {sample}"
    elif "observed_value" in res:
        # GX reports an infinite divergence as None (not JSON-serialisable otherwise).
        seen = "observed infinite divergence" if res["observed_value"] is None else f"observed {res['observed_value']}"
    else:
        seen = "failed"
    return f"[{batch}] {cfg.type}({args}): {seen}"


def _gx_context(docs_dir: str) -> Any:
    # No telemetry from a pipeline task, and no progress bars in task logs.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.update_data_docs_site("local_site", {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        # Validation result pages (which show every expectation with what was observed) and the index;
        # the separate expectation-suite pages would only repeat the suites.
        "site_section_builders": {"expectations": "0", "profiling": "0"},
    })
    return ctx


def run_suites(
    manifest: dict[str, Any],
    snapshot: pd.DataFrame,
    cfg: SuiteConfig,
    docs_dir: str,
    reference: pd.DataFrame | None = None,
) -> tuple[Any, list[str], dict[str, Any]]:
    """Run the suites through GX Checkpoints and build Data Docs into ``docs_dir``.

    ``snapshot`` is the whole snapshot in split order (train, val, test, with the row counts of the
    manifest); ``reference`` the champion's train split (drift suite). Returns the GX results per batch,
    one line per failed expectation and the statistics.
    """
    import great_expectations as gx

    ctx = _gx_context(docs_dir)
    # Batches share the snapshot's memory: the split suite reads only the label, so each split batch is
    # a row range of that one column (GX's pandas engine copies a batch's frame for each row filter it
    # applies, so narrow batches matter more than anything else for its speed).
    label = manifest["label_column"]
    batches: dict[str, pd.DataFrame] = {"snapshot": snapshot}
    start = 0
    for split in ("train", "val", "test"):
        rows = manifest["splits"][split]["rows"]
        batches[split] = snapshot[[label]].iloc[start:start + rows]
        start += rows
    if start != len(snapshot):
        raise ValueError(f"snapshot has {len(snapshot)} rows, its manifest's splits {start}")
    snapshot_suite = ctx.suites.add(gx.ExpectationSuite(
        name=SNAPSHOT_SUITE, expectations=snapshot_expectations(manifest, cfg)))
    split_suite = ctx.suites.add(gx.ExpectationSuite(name=SPLIT_SUITE, expectations=split_expectations(manifest, cfg)))
    suites = {"snapshot": snapshot_suite, "train": split_suite, "val": split_suite, "test": split_suite}
    if reference is not None:
        drift = drift_expectations(manifest, reference, cfg)
        columns = [e.column for e in drift]
        batches["newest"] = snapshot[columns].iloc[start - manifest["splits"]["test"]["rows"]:]
        suites["newest"] = ctx.suites.add(gx.ExpectationSuite(name=DRIFT_SUITE, expectations=drift))
    source = ctx.data_sources.add_pandas(f"dataset_{manifest['dataset_version']}")
    started = time.perf_counter()
    results = {}
    for name, df in batches.items():
        batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(
            name=f"{name}_validation", data=batch_def, suite=suites[name],
        ))
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=f"{name}_checkpoint", validation_definitions=[vd],
            actions=[],
            # BASIC: counts, percentages and a sample of unexpected values (what the failure lines and
            # Data Docs show); SUMMARY would add index lists, each another filtered copy of the batch.
            result_format={"result_format": "BASIC"},
        ))
        # One checkpoint per batch: each batch needs its own dataframe as a runtime parameter.
        cp_result = checkpoint.run(batch_parameters={"dataframe": df})
        (vr,) = cp_result.run_results.values()
        results[name] = vr
    validated = time.perf_counter()
    # Data Docs once for all batches (GX's per-checkpoint docs action re-renders the whole site each time).
    ctx.build_data_docs()
    failed = [_describe(name, er) for name, vr in results.items() for er in vr.results if not er.success]
    stats: dict[str, Any] = {name: dict(vr.statistics) for name, vr in results.items()}
    stats["rows"] = len(snapshot)
    stats["evaluated_expectations"] = sum(s["evaluated_expectations"] for s in stats.values() if isinstance(s, dict))
    stats["unsuccessful_expectations"] = len(failed)
    stats["seconds"] = {"validation": round(validated - started, 3),
                        "data_docs": round(time.perf_counter() - validated, 3)}
    return results, failed, stats


def validate_snapshot(
    snapshot_uri: str,
    report_root: str,
    config: SuiteConfig | None = None,
    reference_uri: str | None = None,
    settings: Settings | None = None,
) -> ValidationReport:
    """Validate the snapshot at ``snapshot_uri``; write JSON + Data Docs under ``report_root``.

    ``config``: the thresholds, normally ``suite_config(settings.definition)``; without one, those of the
    pipeline named in the snapshot's manifest (read from the settings' pipelines directory).
    ``reference_uri``: the snapshot the current champion was trained on; when given, the drift suite
    compares the newest split with its train split. Returns the report whatever the outcome; call
    ``raise_for_failure()`` to stop a pipeline on failure. A snapshot (or reference) whose files do not
    match its manifest's sha256 raises DataError before any expectation runs. ``settings``: whose object
    storage to read and write (default: the environment's).
    """
    from ctrain import layout, storage
    from ctrain.snapshot import read_frame, read_manifest

    manifest, snapshot = read_frame(snapshot_uri, settings=settings)
    if config is None:
        from ctrain.settings import get_settings

        config = suite_config(get_settings(manifest.get("pipeline")).definition)
    cfg = config
    # The drift reference is the champion's train split; only its feature and label columns are read.
    reference = None
    if reference_uri:
        ref_schema = read_manifest(reference_uri, settings)["schema"]
        wanted = [c for c in (*manifest["feature_columns"], manifest["label_column"]) if c in ref_schema]
        reference = read_frame(reference_uri, ("train",), wanted, settings)[1]
    version = manifest["dataset_version"]
    result_id = f"{version}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
    out_uri = layout.validation_report_uri(report_root, version, result_id)

    with tempfile.TemporaryDirectory(prefix="ctrain-gx-") as docs_dir:
        results, failed, stats = run_suites(manifest, snapshot, cfg, docs_dir, reference)
        success = not failed
        body = {
            "result_id": result_id,
            "dataset_version": version,
            "snapshot_uri": snapshot_uri,
            "reference_uri": reference_uri,
            "success": success,
            "failed": failed,
            "statistics": stats,
            "suite_config": asdict(cfg),
            "results": {name: vr.to_json_dict() for name, vr in results.items()},
        }
        # Data Docs first, result.json last: a result.json means the whole report is there.
        for path in sorted(Path(docs_dir).rglob("*")):
            if path.is_file():
                storage.put_bytes(storage.join(out_uri, "data_docs", path.relative_to(docs_dir).as_posix()),
                                  path.read_bytes(), settings)
        storage.put_bytes(storage.join(out_uri, "result.json"), json.dumps(body, indent=2, default=str).encode(),
                          settings)

    report = ValidationReport(
        success=success, dataset_version=version, result_id=result_id, failed=failed, statistics=stats,
        report_uri=f"{out_uri}/result.json", docs_uri=f"{out_uri}/data_docs/index.html",
    )
    log.info("GX gate on %s: %s (%d failed); report %s; docs %s", version,
             "passed" if success else "FAILED", len(failed), report.report_uri, report.docs_uri)
    return report
