"""The `simsearch` command line: parses, calls one library function, prints.

stdout carries data (JSON lines or a table); stderr carries people's messages.
Library errors become one line on stderr and exit code 1, never a traceback.
"""
from __future__ import annotations

from simsearch.cli.app import app, main
from simsearch.cli import core  # noqa: F401  (registers its commands on `app`)

for _module in ("localizer", "browse", "maps", "retrieval", "duplicates"):  # command groups that exist in this install
    try:
        __import__(f"simsearch.cli.{_module}")
    except ModuleNotFoundError as _e:
        if _e.name != f"simsearch.cli.{_module}":
            raise

__all__ = ["app", "main"]
