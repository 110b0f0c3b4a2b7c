"""fsspec access to object storage (``file://``, ``s3://``) with the S3 endpoint taken from the environment.

``CTRAIN_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) points s3fs at MinIO or a moto server; addressing is
path-style so bucket names need no DNS. Credentials come from the usual AWS environment variables.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri`` (empty for local files)."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options: dict[str, Any] = {"config_kwargs": {"s3": {"addressing_style": "path"}}}
    endpoint = os.environ.get("CTRAIN_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
