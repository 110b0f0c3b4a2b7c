"""The audit log of a registered model: append-only, hash-chained, one file per record.

``{object_root}/audit/{model}/{seq:08d}.json`` (:mod:`ctrain.layout`). Record ``n`` holds the
:class:`ctrain.registry.AuditRecord` fields plus ``seq`` (n), ``prev_sha256`` (record n-1's ``sha256``, ""
for record 0), ``aliases`` (who holds ``champion``/``challenger``/``previous`` once the record's move is
applied; unchanged for a decision that moves nothing) and ``sha256`` (of every other field, canonical
JSON). So an edited record no longer matches its own hash (or, when its hash was recomputed, the next
record's ``prev_sha256``), and a deleted middle record leaves a gap in ``seq``.

Deleting the newest records leaves a shorter but consistent chain, so the head (``seq:sha256``) is also
anchored outside the log, on the registered model's tag ``ctrain.audit_head``, after every append.

Appends are conditional creates (:func:`ctrain.storage.create_bytes`: a local hard link, or an S3 PUT
with ``If-None-Match: *``, which moto's server honours too): of two writers that both read head n-1,
exactly one writes record n; the other gets :class:`AuditConflict` and must re-read.

Nothing here is unpickled or imported from storage: records are JSON documents read as data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ctrain import layout, storage
from ctrain.errors import CtrainError, DataError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ctrain.settings import Settings

log = logging.getLogger(__name__)

ALIASES = ("champion", "challenger", "previous")
HEAD_TAG = "ctrain.audit_head"
CHAIN_FIELDS = ("seq", "prev_sha256", "aliases", "sha256")

Aliases = dict[str, str | None]


class AuditConflict(CtrainError):
    """Another writer appended the same record number first (the conditional create refused this one)."""

    retryable = True


@dataclass(frozen=True)
class Entry:
    """One stored record of a chain: its number, where it is, and the document as stored."""

    seq: int
    uri: str
    doc: dict[str, Any]

    @property
    def aliases(self) -> Aliases:
        stored = self.doc.get("aliases") or {}
        return {alias: stored.get(alias) for alias in ALIASES}

    @property
    def sha256(self) -> str:
        return str(self.doc.get("sha256", ""))


def no_aliases() -> Aliases:
    return dict.fromkeys(ALIASES)


def digest(doc: dict[str, Any]) -> str:
    """sha256 of ``doc`` without its own ``sha256`` field, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_chain(settings: Settings, model: str) -> list[Entry]:
    """Every stored record of ``model``'s chain in ``seq`` order, as stored (not checked: see :func:`verify`)."""
    root = settings.resolved_object_root
    directory = layout.audit_dir(root, model)
    entries = []
    for name in storage.list_names(directory, settings):
        seq = layout.audit_seq(name)
        if seq is None:
            continue
        uri = layout.audit_record_uri(root, model, seq)
        try:
            doc = storage.read_json(uri, settings)
        except ValueError:
            doc = {"unreadable": True}  # verify names it; no record is ever parsed as anything but JSON
        entries.append(Entry(seq, uri, doc if isinstance(doc, dict) else {"unreadable": True}))
    return sorted(entries, key=lambda e: e.seq)


def state(chain: list[Entry]) -> Aliases:
    """Who holds each alias according to the chain (nobody for an empty one)."""
    return chain[-1].aliases if chain else no_aliases()


def append(settings: Settings, model: str, record: dict[str, Any], aliases: Aliases,
           chain: list[Entry]) -> Entry:
    """Write ``record`` as the record after ``chain``'s head; AuditConflict if another writer got there first."""
    seq = chain[-1].seq + 1 if chain else 0
    doc = json.loads(json.dumps(record, default=str))  # what is hashed is exactly what is stored and read back
    doc.update(seq=seq, prev_sha256=chain[-1].sha256 if chain else "", aliases=dict(aliases))
    doc["sha256"] = digest(doc)
    uri = layout.audit_record_uri(settings.resolved_object_root, model, seq)
    try:
        storage.create_bytes(uri, json.dumps(doc, indent=2, sort_keys=True).encode(), settings)
    except FileExistsError:
        raise AuditConflict(f"audit record {seq} of {model} was written by another writer first ({uri}); "
                            "re-read the chain and decide again") from None
    return Entry(seq, uri, doc)


def anchor(client: MlflowClient, model: str, entry: Entry) -> None:
    """Record ``entry`` as the chain's head on the registered model (tag ``ctrain.audit_head``)."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_tag(model, HEAD_TAG, f"{entry.seq}:{entry.sha256}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("audit record %s of %s is not anchored: no registered model %r in MLflow", entry.seq,
                    model, model)


def read_anchor(client: MlflowClient, model: str) -> tuple[int, str] | None:
    """The anchored head ``(seq, sha256)``, None when the model or its tag does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        value = client.get_registered_model(model).tags.get(HEAD_TAG)
    except MlflowException:
        return None
    if not value:
        return None
    seq, _, sha = value.partition(":")
    if not seq.isdigit() or not sha:
        raise DataError(f"tag {HEAD_TAG}={value!r} on registered model {model} is not <seq>:<sha256>; it was "
                        "edited outside ctrain (run `ctrain audit verify` and restore it from the chain)")
    return int(seq), sha


def check_head(client: MlflowClient, model: str, chain: list[Entry]) -> None:
    """Refuse to append after a chain whose anchored head is missing (its newest records were deleted):
    an append would reuse their numbers and hide the deletion."""
    head = read_anchor(client, model)
    last = chain[-1].seq if chain else -1
    if head is not None and head[0] > last:
        raise DataError(f"the audit chain of {model} ends at record {last} but its anchored head is record "
                        f"{head[0]}: records were deleted. Nothing was moved; restore them from a backup of "
                        f"the object store (`ctrain audit verify {model}` lists what is missing)")


def verify(settings: Settings, client: MlflowClient, model: str) -> list[str]:
    """What is wrong with ``model``'s chain, first broken record first ([] when intact)."""
    return problems(settings, client, model, read_chain(settings, model))


def check(settings: Settings, client: MlflowClient, model: str, chain: list[Entry]) -> None:
    """Refuse to move anything on a broken chain: DataError naming the first broken record."""
    found = problems(settings, client, model, chain)
    if found:
        raise DataError(f"the audit chain of {model} is broken: {found[0]}. Nothing was moved; restore the "
                        f"records from a backup of the object store (`ctrain audit verify {model}` checks it)")


def problems(settings: Settings, client: MlflowClient, model: str, chain: list[Entry]) -> list[str]:
    """:func:`verify` of an already read ``chain``."""
    prev_sha = ""
    for expected, entry in enumerate(chain):
        if entry.seq != expected:
            return [f"record {expected} deleted: the chain goes from record {expected - 1} to {entry.seq} "
                    f"({layout.audit_record_uri(settings.resolved_object_root, model, expected)} is missing)"]
        if entry.doc.get("unreadable"):
            return [f"record {entry.seq} edited: {entry.uri} is not a JSON object"]
        if entry.doc.get("seq") != entry.seq or digest(entry.doc) != entry.sha256:
            return [f"record {entry.seq} edited: {entry.uri} no longer matches its sha256"]
        if entry.doc.get("prev_sha256") != prev_sha:
            return [f"record {entry.seq - 1} edited or replaced: record {entry.seq} holds another hash of it "
                    f"({entry.uri})"]
        prev_sha = entry.sha256
    head = read_anchor(client, model)
    last = chain[-1].seq if chain else -1
    if head is None:
        return [f"tail unanchored: {model} has {len(chain)} audit records but no {HEAD_TAG} tag"] if chain else []
    seq, sha = head
    if seq > last:
        return [f"tail missing: records {last + 1}..{seq} deleted (the anchored head is record {seq}, the "
                f"chain ends at {last})"]
    if chain[seq].sha256 != sha:
        return [f"record {seq} replaced: its hash differs from the anchored head {HEAD_TAG}={seq}:{sha[:12]}..."]
    if last - seq > 1:  # one unanchored record is a crash between append and anchor; more is not ctrain's
        return [f"records {seq + 2}..{last} appended without being anchored (head tag at record {seq})"]
    return []


@dataclass(frozen=True)
class Tenure:
    """One holder of one alias: from which record (and time) until which."""

    alias: str
    version: str
    since: float
    until: float | None  # None: still holds it
    by: str  # "<action> by <decided_by> (record n)"


def history(chain: list[Entry]) -> list[Tenure]:
    """Who held each alias when, rebuilt from the chain's ``aliases`` (alias order, then time)."""
    tenures: list[Tenure] = []
    holding: dict[str, tuple[str, float, str]] = {}
    for entry in chain:
        at = float(entry.doc.get("at") or 0.0)
        by = f"{entry.doc.get('action')} by {entry.doc.get('decided_by')} (record {entry.seq})"
        for alias, version in entry.aliases.items():
            current = holding.get(alias)
            if current is not None and current[0] == version:
                continue
            if current is not None:
                tenures.append(Tenure(alias, current[0], current[1], at, current[2]))
                del holding[alias]
            if version is not None:
                holding[alias] = (version, at, by)
    tenures += [Tenure(alias, v, since, None, by) for alias, (v, since, by) in holding.items()]
    return sorted(tenures, key=lambda t: (ALIASES.index(t.alias), t.since))


def format_history(model: str, tenures: list[Tenure]) -> str:
    """A plain-text table of :func:`history`."""
    rows = [("alias", "version", "from (UTC)", "until (UTC)", "set by")]
    rows += [(t.alias, f"v{t.version}", _when(t.since), _when(t.until) if t.until else "now", t.by)
             for t in tenures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"alias history of {model}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) if tenures else f"{model}: no alias moves recorded"


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def alert_external_move(model: str, changes: dict[str, dict[str, str | None]], uri: str) -> None:
    """The one place an alias move done outside ctrain is reported (a WARNING today; issue 13's alerts hook
    in here)."""
    moved = ", ".join(f"{alias} v{c['from']} -> v{c['to']}" for alias, c in sorted(changes.items()))
    log.warning("aliases of %s moved outside ctrain: %s (recorded as %s)", model, moved, uri)
