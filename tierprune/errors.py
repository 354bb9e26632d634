"""User-facing errors: the CLI prints their message on one line and exits non-zero."""
from __future__ import annotations


class TierpruneError(Exception):
    """Bad input from the user (model, data, flags). Never a bug in tierprune."""
