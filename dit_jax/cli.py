"""Shared entry-point behaviour of the command-line tools: quiet logs by default (pass
--verbosity=0 for INFO) and user errors as one line on stderr with exit status 1."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging


def run(main: Callable, errors: tuple = (ValueError, OSError)) -> None:
    """app.run(main) with WARNING logs by default and `errors` shown as one line (exit 1)."""
    flags.FLAGS.set_default("verbosity", logging.WARNING)

    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:  # libraries may have lowered it on import
            logging.set_verbosity(logging.WARNING)
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            return main(argv)
        except errors as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(guarded)
