"""Shared entry-point behaviour of the command-line tools: quiet logs by default (pass
--verbosity=0 for INFO) and user errors as one line on stderr with exit status 1."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging


def run(main: Callable) -> None:
    flags.FLAGS.set_default("verbosity", logging.WARNING)

    def guarded(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            return main(argv)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(guarded)
