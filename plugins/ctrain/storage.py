"""Object storage: every file ctrain opens in ``{object_root}`` goes through here.

One place knows how a URI (``file://``, a local path, ``s3://``) becomes an fsspec filesystem: S3 goes to
``CTRAIN_S3_ENDPOINT_URL`` (MinIO, moto) with path-style addressing when it is set, so bucket names need no
DNS, and to AWS otherwise. Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or an instance role), never from a URI (the settings refuse one that embeds a
password). ``AWS_ENDPOINT_URL`` is not needed: the settings' endpoint is passed explicitly.

The trainer image has its own copy of this rule (``trainer.storage``, same variable); the pipeline passes
``CTRAIN_S3_ENDPOINT_URL`` to the training processes.

Writes are all-or-nothing (:func:`write_bytes`): a reader sees a whole object or none.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from ctrain.settings import Settings


def storage_options(uri: str, settings: Settings | None = None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri`` (empty for local files); ``settings`` default: the environment's."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    if settings is None:
        from ctrain.settings import get_settings

        settings = get_settings()
    options: dict[str, Any] = {}
    if settings.s3_endpoint_url:
        options["endpoint_url"] = settings.s3_endpoint_url
        options["config_kwargs"] = {"s3": {"addressing_style": "path"}}
    return options


def open_fs(uri: str, settings: Settings | None = None) -> tuple[AbstractFileSystem, str]:
    """fsspec filesystem for ``uri`` and the path inside it (no trailing slash)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, settings))
    return fs, path.rstrip("/") or path


def join(uri: str, *parts: str) -> str:
    """``uri`` and path segments joined with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one object so that readers see all of it or nothing (rename locally; one PUT on S3)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:  # a full disk or a kill mid-write leaves no partial file behind
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        fs.pipe_file(path, data)


def create_bytes(uri: str, data: bytes, settings: Settings | None = None) -> str:
    """Write ``uri`` only if nothing is there yet (FileExistsError otherwise), all-or-nothing; returns ``uri``.

    Of two writers racing for one name exactly one succeeds: locally a hard link of the finished temp
    file (``link`` refuses an existing name, atomically); on S3 a PUT with ``If-None-Match: *``."""
    import errno

    from fsspec.implementations.local import LocalFileSystem

    fs, path = open_fs(uri, settings)
    if not isinstance(fs, LocalFileSystem):
        try:
            fs.pipe_file(path, data, mode="create")
        except OSError as exc:  # s3fs maps a 412 without the If-None-Match condition to EINVAL
            if isinstance(exc, FileExistsError) or exc.errno == errno.EINVAL and "recondition" in str(exc):
                raise FileExistsError(uri) from None
            raise
        return uri
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return uri


def put_bytes(uri: str, data: bytes, settings: Settings | None = None) -> str:
    """:func:`write_bytes` to ``uri``; returns ``uri``."""
    fs, path = open_fs(uri, settings)
    write_bytes(fs, path, data)
    return uri


def put_json(uri: str, record: Any, settings: Settings | None = None) -> str:
    """One JSON document at ``uri`` (indented, keys sorted), written all-or-nothing; returns ``uri``."""
    return put_bytes(uri, json.dumps(record, indent=2, sort_keys=True, default=str).encode(), settings)


def read_bytes(uri: str, settings: Settings | None = None) -> bytes:
    """The object at ``uri`` (FileNotFoundError if there is none)."""
    fs, path = open_fs(uri, settings)
    return fs.cat_file(path)


def read_json(uri: str, settings: Settings | None = None) -> Any | None:
    """The JSON document at ``uri``, or None when there is none; ValueError if it is not JSON."""
    try:
        data = read_bytes(uri, settings)
    except FileNotFoundError:
        return None
    return json.loads(data)


def exists(uri: str, settings: Settings | None = None) -> bool:
    fs, path = open_fs(uri, settings)
    return fs.exists(path)


def remove(uri: str, settings: Settings | None = None) -> None:
    """Delete the object at ``uri`` if it exists."""
    fs, path = open_fs(uri, settings)
    if fs.exists(path):
        fs.rm(path)


def list_names(uri: str, settings: Settings | None = None) -> list[str]:
    """Names (last path segment) of the entries directly under the directory ``uri``, sorted; [] if absent."""
    fs, path = open_fs(uri, settings)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
