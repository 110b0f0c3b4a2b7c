"""The ``ctrain`` command: a model's alias history, its audit check, rollback and retirement.

    ctrain history MODEL                                   who held champion/challenger/previous when
    ctrain audit verify MODEL                              exit 0 when the chain is intact, 1 naming the first broken record
    ctrain rollback MODEL --to previous|VERSION --reason TEXT
    ctrain retire MODEL [--keep N] [--reason TEXT]

MODEL is a registered model name; the pipeline whose definition registers it (in ``CTRAIN_PIPELINES_DIR``)
gives the settings (object root, MLflow). Rollback and retirement go through the same locked, audited
move as the pipeline's promotion (:mod:`ctrain.registry`), decided by ``cli:<os user>``. Also runnable as
``python -m ctrain``. Exit codes: 0 done, 1 verify found a broken chain, 2 a refused input or state.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from typing import TYPE_CHECKING

from ctrain.errors import ConfigError, CtrainError

if TYPE_CHECKING:
    from ctrain.settings import Settings

EXIT_BROKEN, EXIT_REFUSED = 1, 2


def settings_for(model: str, pipeline: str | None = None) -> Settings:
    """The settings of the pipeline that registers ``model`` (or of ``pipeline`` when given)."""
    from ctrain.definition import load_all
    from ctrain.settings import get_settings

    if pipeline:
        return get_settings(pipeline=pipeline)
    definitions = load_all(get_settings().pipelines_dir)
    for name, definition in sorted(definitions.items()):
        if definition.model.name == model:
            return get_settings(pipeline=name)
    known = ", ".join(sorted(f"{d.model.name} ({n})" for n, d in definitions.items()))
    raise ConfigError(f"no pipeline definition registers a model called {model!r}; known models: {known}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("model", help="registered model name (a definition's model.name)")
        cmd.add_argument("--pipeline", help="the pipeline's settings to use (default: the one registering MODEL)")
        return cmd

    command("history", "who held champion/challenger/previous, from when to when")
    verify = sub.add_parser("audit", help="check the audit chain").add_subparsers(dest="audit", required=True)
    check = verify.add_parser("verify", help="exit 1 naming the first edited, deleted or missing record")
    check.add_argument("model")
    check.add_argument("--pipeline")
    rollback = command("rollback", "make the previous (or a given) version champion again")
    rollback.add_argument("--to", required=True, help="'previous' or a version number")
    rollback.add_argument("--reason", required=True, help="why (recorded in the audit chain)")
    retire = command("retire", "archive versions older than the newest N (never an alias holder)")
    retire.add_argument("--keep", type=int, default=None, help="default: the definition's governance.keep_versions")
    retire.add_argument("--reason", default="", help="recorded in the audit chain and the version's tag")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except CtrainError as exc:
        print(f"ctrain {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def _run(args: argparse.Namespace) -> int:
    from ctrain import audit, registry

    settings = settings_for(args.model, args.pipeline)
    if settings.model_name != args.model:
        raise ConfigError(f"pipeline {settings.pipeline!r} registers {settings.model_name!r}, not {args.model!r}")
    client = registry.get_client(settings)
    user = f"cli:{getpass.getuser()}"
    if args.command == "history":
        print(audit.format_history(args.model, audit.history(audit.read_chain(settings, args.model))))
        return 0
    if args.command == "audit":
        problems = audit.verify(settings, client, args.model)
        if problems:
            print(f"{args.model}: audit chain BROKEN: {problems[0]}")
            return EXIT_BROKEN
        before = len(audit.read_chain(settings, args.model))
        chain = registry.check_external_moves(client, settings)
        print(f"{args.model}: audit chain intact ({len(chain)} records"
              f"{', head ' + chain[-1].sha256[:12] if chain else ''})")
        for entry in chain[before:]:
            print(f"{args.model}: aliases moved outside ctrain, recorded as record {entry.seq}: "
                  f"{entry.doc['details']['changes']}")
        return 0
    if args.command == "rollback":
        done = registry.rollback(client, settings, args.to, args.reason, user)
        print(f"{args.model}: champion v{done['champion']} (previous v{done['previous']}); "
              f"audit record {done['audit_uri']}")
        return 0
    keep = args.keep if args.keep is not None else settings.definition.governance.keep_versions
    retired = registry.retire(client, settings, keep, args.reason or f"older than the newest {keep} versions", user)
    print(f"{args.model}: retired {', '.join('v' + v for v in retired) if retired else 'nothing'} (kept {keep})")
    return 0
