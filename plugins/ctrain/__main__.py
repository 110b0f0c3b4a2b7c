"""``python -m ctrain ...``: the ``ctrain`` command (see :mod:`ctrain.cli`).

Runs only as ``python -m ctrain``: Airflow's plugin manager imports files under ``plugins/`` with the file's
stem as the module name, so this file would also see ``__name__ == "__main__"`` there (plugins/.airflowignore
keeps it out; the spec check is the second guard)."""

from __future__ import annotations

if __name__ == "__main__" and __spec__ is not None and __spec__.name == "ctrain.__main__":
    from ctrain.cli import main

    raise SystemExit(main())
