"""Command line: parse, build, run, and turn the outcome into an exit code and ``result.json``.

    torchrun --nproc-per-node=2 -m trainer train --config configs/default.yaml \\
        --set data.dataset_uri=file:///.../datasets/<version> --set checkpoint.uri=... --set output.uri=...
    python -m trainer schema        # JSON schema of the config (for Airflow Params)
    python -m trainer config-table  # the config reference table of training_image/README.md
    python -m trainer overrides-schema  # dags/trainer_overrides.schema.json (the DAG's Param schema)

Exit codes: 0 ok, 65 bad data/config, 70 divergence or bug, 75 retryable (see trainer.contract). torchrun
itself exits 1 when any worker fails, so the launcher reads the code from ``failure.json`` (``exit_code``),
which rank 0 writes on every failure it lives to record. The same record goes to ``result.json`` unless
that holds a succeeded result (a rerun refused at resume never replaces one) or another trainer holds the
checkpoint directory's lease (trainer.lease; that trainer owns ``result.json``).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from trainer import distributed
from trainer.config import TrainerConfig, json_schema, load_config, markdown_table, overrides_schema
from trainer.contract import EXIT_OK, EXIT_RETRYABLE, EXIT_SOFTWARE, FAILURE_FILE, RESULT_FILE, TrainerResult
from trainer.errors import RetryableError, TrainerError
from trainer.lease import Lease, LeaseHeld
from trainer.storage import filesystem, join

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger("trainer")

FAILURE_RECORDED = "failure_recorded"
# Messages of collective failures that mean a peer is gone rather than a bug in this process.
# Compared in lower case: gloo says "Timed out waiting 5000ms for recv", others "timeout" or "timed out".
_LOST_PEER_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m trainer`` and the ``ctrain-trainer`` script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    if args.command == "config-table":
        print(markdown_table())
        return EXIT_OK
    if args.command == "overrides-schema":
        print(json.dumps(overrides_schema(), indent=1, sort_keys=True))
        return EXIT_OK
    _setup_logging(int(os.environ.get("RANK", "0")))
    # `kill -USR1 <pid>` prints every thread's stack: the first thing to look at when a rank hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # SIGTERM (torchrun stopping the group, Airflow killing the task, pod eviction) becomes an
    # exception, so the MLflow run and result.json are closed as retryable instead of left RUNNING.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        cfg = load_config(args.config, args.overrides)
    except TrainerError as exc:
        log.error("%s", exc)
        # Every rank records it (the same record: no process group exists yet, so no rank can wait for
        # another): torchrun stops the others as soon as the first one exits, and a rank 0 that alone
        # recorded it could be stopped before it did. SIGTERM waits until the record is whole.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _record_config_failure(args.config, args.overrides, exc)
        return exc.exit_code
    return run(cfg)


def _record_config_failure(config: str | None, overrides: list[str], exc: TrainerError) -> None:
    """A config refused at load still leaves its failure.json (when output.uri can be read at all), so
    the launcher sees the terminal code instead of torchrun's 1 and does not retry a bad config."""
    import yaml

    output_uri = None
    for assignment in overrides:
        key, _, value = assignment.partition("=")
        if key.strip() == "output.uri":
            output_uri = value.strip()
    if output_uri is None and config:
        try:
            tree = yaml.safe_load(Path(config).read_text())
            output_uri = tree.get("output", {}).get("uri") if isinstance(tree, dict) else None
        except Exception:
            output_uri = None
    if not isinstance(output_uri, str) or not output_uri or urlsplit(output_uri).password is not None:
        return  # nowhere to write, or a URI the config check refused for holding a secret
    record = TrainerResult.failure(exc, exc.exit_code, run_id=None)
    try:
        write_result(output_uri, record, FAILURE_FILE)
    except Exception:
        log.exception("could not write the failure record under %s", output_uri)


def run(cfg: TrainerConfig) -> int:
    """Train with ``cfg`` in this process; returns the exit code (a torchrun worker exits instead)."""
    from trainer.loop import Trainer

    ctx = None
    lease: Lease | None = None
    trainer: Trainer | None = None
    try:
        ctx = distributed.init(cfg.distributed.backend, cfg.distributed.timeout_s)
        if not _already_done(cfg):
            # Before anything under checkpoint.uri is read or changed: one trainer per directory.
            lease = Lease.acquire(cfg.checkpoint.uri, ctx, config_hash=cfg.config_hash())
            trainer = Trainer(cfg, ctx, lease)
            result = TrainerResult.model_validate(trainer.fit())
            if ctx.is_main:
                write_result(cfg.output.uri, result)
                trainer.tracker.finish("FINISHED")
                log.info("done: %s", json.dumps(result.metrics, sort_keys=True))
            lease.release()
        code = EXIT_OK
    except Exception as exc:
        code = exit_code_for(exc)
        if isinstance(exc, TrainerError):
            log.error("%s (exit %d)", exc, code)
        else:
            log.exception("training failed (exit %d)", code)
        if trainer is not None and code != EXIT_RETRYABLE:
            trainer.checkpoints.drain()
        # torchrun stops every worker as soon as one exits with an error, so the other ranks wait
        # (briefly, and without collectives) until rank 0 has recorded the failure - unless torchrun
        # is already stopping this one (SIGTERM): then rank 0 is being stopped too, or is gone.
        if ctx is None or ctx.is_main:
            # torchrun SIGTERMs rank 0 too when another rank dies; recording takes well under its
            # 30 s grace period, and an interrupted one would leave the MLflow run RUNNING.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _record_failure(cfg, trainer, exc, code)
            if lease is not None:  # after a retryable failure the next attempt continues the MLflow run
                lease.release(keep_run=code == EXIT_RETRYABLE)
            if ctx is not None:
                distributed.signal_done(ctx, FAILURE_RECORDED)
        elif not isinstance(exc, _Terminated):
            distributed.wait_done(ctx, FAILURE_RECORDED, timeout_s=60)
    if ctx is not None and ctx.is_distributed:
        # Leave without freeing DDP and the process groups: after a peer died mid-collective,
        # ProcessGroupGloo's destructor (holding the GIL) and its worker thread (waiting for the
        # GIL) deadlock, and the worker would never exit. Everything that matters is closed by now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to the contract's exit code."""
    import torch.distributed as dist

    if isinstance(exc, TrainerError):
        return exc.exit_code
    if isinstance(exc, dist.DistError | TimeoutError | ConnectionError):
        return EXIT_RETRYABLE
    if isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in _LOST_PEER_MARKERS):
        return EXIT_RETRYABLE
    return EXIT_SOFTWARE


def write_result(output_uri: str, result: TrainerResult, name: str = RESULT_FILE) -> str:
    """Write ``result.json`` (or ``name``) under ``output_uri``; returns its URI."""
    fs, root = filesystem(output_uri)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{name}", result.to_json().encode())
    return join(output_uri, name)


def read_result(output_uri: str) -> TrainerResult | None:
    """The ``result.json`` under ``output_uri``, or None if there is none."""
    fs, root = filesystem(output_uri)
    try:
        return TrainerResult.from_json(fs.cat_file(f"{root}/{RESULT_FILE}"))
    except FileNotFoundError:
        return None
    except ValueError:  # not a result this trainer wrote: treated as absent, and replaced
        log.warning("%s is not a JSON object; ignoring it", join(output_uri, RESULT_FILE))
        return None


def _already_done(cfg: TrainerConfig) -> bool:
    """A duplicate trigger for a run that already succeeded with this config is a no-op."""
    previous = read_result(cfg.output.uri)
    done = bool(previous and previous.succeeded and previous.config_hash == cfg.config_hash())
    if done:
        log.info(
            "%s already holds a successful result for config %s; nothing to do",
            cfg.output.uri,
            cfg.config_hash(),
        )
    return done


def _record_failure(cfg: TrainerConfig, trainer: Trainer | None, exc: BaseException, code: int) -> None:
    """Best effort: close this trainer's MLflow run (if it opened one) and write the failure record with
    the real exit code to failure.json, and to result.json unless that is not ours to replace."""
    run_id = trainer.tracker.run_id if trainer is not None else None
    if trainer is not None and run_id is not None:
        try:
            trainer.tracker.set_tags({"last_failure": f"exit {code}: {exc}"[:5000]})
            trainer.tracker.finish("KILLED" if code == EXIT_RETRYABLE else "FAILED")
        except Exception:
            log.exception("could not close MLflow run %s", run_id)
    record = TrainerResult.failure(exc, code, run_id, config_hash=cfg.config_hash(), seed=cfg.seed)
    try:
        uri = write_result(cfg.output.uri, record, FAILURE_FILE)
        previous = read_result(cfg.output.uri)
        if isinstance(exc, LeaseHeld):  # the lease holder owns result.json
            log.info("failure recorded in %s only: another trainer holds the lease", uri)
        elif previous is not None and previous.succeeded:
            log.warning(
                "%s holds a succeeded result (config %s); it stays, and this failure is recorded in %s",
                join(cfg.output.uri, RESULT_FILE),
                previous.config_hash,
                uri,
            )
        else:
            write_result(cfg.output.uri, record)
    except Exception:
        log.exception("could not write the failure record under %s", cfg.output.uri)


class _Terminated(RetryableError):
    """This process received SIGTERM (torchrun stopping the group, Airflow killing the task)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated(f"received {signal.Signals(signum).name}; a rerun resumes from the last checkpoint")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="ctrain training task")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model on a dataset snapshot")
    train.add_argument("--config", help="YAML config file (see training_image/configs/)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML syntax), repeatable",
    )
    sub.add_parser("schema", help="print the config JSON schema")
    sub.add_parser("config-table", help="print the config reference table (markdown)")
    sub.add_parser("overrides-schema", help="print the JSON schema of --set overrides (the DAG's Param)")
    return parser
