"""Training checkpoints (Orbax): what is silenced after a failed restore. Saving, restoring,
fingerprints and falling back past bad steps are exercised end to end in test_reliability.py."""

import asyncio
import sys
import types

from dit_jax import checkpoints


def test_only_late_callbacks_to_a_closed_loop_are_silenced(monkeypatch):
    """After a failed restore, reads still in flight call back into Orbax's closed asyncio loop:
    those reports are dropped; any other unraisable exception still reaches the previous hook."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def report(exc):
        return types.SimpleNamespace(
            exc_type=type(exc),
            exc_value=exc,
            exc_traceback=exc.__traceback__,
            err_msg=None,
            object=None,
        )

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = report(e)
    try:
        raise RuntimeError("Event loop is closed")  # the same message, not from a callback
    except RuntimeError as e:
        other_closed = report(e)
    try:
        raise ValueError("boom")
    except ValueError as e:
        other = report(e)
    checkpoints._drop_late_callbacks_to_closed_loops()
    checkpoints._drop_late_callbacks_to_closed_loops()  # installed once, not stacked
    for args in (late, other_closed, other):
        sys.unraisablehook(args)
    assert seen == [other_closed, other]
