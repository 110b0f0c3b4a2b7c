"""``python -m ctrain ...``: the ``ctrain`` command (see :mod:`ctrain.cli`)."""

from __future__ import annotations

from ctrain.cli import main

raise SystemExit(main())
