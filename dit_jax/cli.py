"""Shared entry-point behaviour of the command-line tools: quiet logs by default (pass
--verbosity=0 for INFO) and user errors (bad flags included) as one line on stderr with exit
status 1, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging


def run(main: Callable, errors: tuple = (ValueError, OSError), positional: bool = False) -> None:
    """app.run(main) with WARNING logs by default and `errors` shown as one line (exit 1).
    Arguments other than flags are refused unless `positional`; then main gets them in argv[1:]."""
    flags.FLAGS.set_default("verbosity", logging.WARNING)

    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:  # libraries may have lowered it on import
            logging.set_verbosity(logging.WARNING)
        try:
            if len(argv) > 1 and not positional:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
            return main(argv)
        except app.UsageError as e:
            _fail(f"{e} (--helpshort lists the flags)")
        except errors as e:
            _fail(e)

    app.run(guarded, flags_parser=_parse_flags)


def _fail(message) -> None:
    """One line on stderr and exit 1 at once: the interpreter's shutdown is skipped, so library
    threads (checkpoint I/O event loops) cannot add tracebacks after the message. Work that must
    finish (checkpoint saves) is awaited before an error reaches here."""
    print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag (unknown, wrong type, a config file that does not
    load, an override of a config field that does not exist) reported as one line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing config field
        while isinstance(e, (AttributeError, KeyError)) and len(e.args) == 1:
            e = e.args[0]
        _fail(f"unknown config field {' '.join(str(e).split())} (--helpshort lists the flags)")
    except (flags.Error, TypeError, ValueError, OSError) as e:
        _fail(f"{' '.join(str(e).split())} (--helpshort lists the flags)")
