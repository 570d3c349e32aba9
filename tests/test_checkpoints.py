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


def test_unretrieved_read_errors_of_a_failed_restore_are_not_logged():
    import logging

    checkpoints._drop_late_callbacks_to_closed_loops()
    checkpoints._drop_late_callbacks_to_closed_loops()  # once, however often it is called
    log = logging.getLogger("asyncio")
    assert sum(isinstance(f, checkpoints._UnretrievedReadErrors) for f in log.filters) == 1

    def passes(message):
        return all(
            f.filter(logging.LogRecord("asyncio", 40, "", 0, message, (), None))
            for f in log.filters
        )

    assert not passes(
        "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished "
        'exception=Exception("Encountered error while reading array index: (slice(0, 8, 1),)")>'
    )
    assert passes("Future exception was never retrieved\nfuture: <Future exception=ValueError()>")
    assert passes("Task was destroyed but it is pending!")


def test_shard_by_shard_digest_equals_the_whole_leafs():
    """The fingerprint of a leaf split over processes is the sum of its shards' digests at their
    global indices (replicas counted once): equal to the digest of the whole array, for sharded,
    partly replicated and odd-shaped leaves, and different when one element changes."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    rng = np.random.default_rng(0)
    cases = [
        (rng.standard_normal((6, 8)).astype(np.float32), P("data", "fsdp")),
        (rng.standard_normal((3, 8, 5)).astype(np.float32), P(None, "fsdp")),  # replicated x2
        (rng.integers(0, 2**31, (8,), dtype=np.int64).astype(np.uint32), P("fsdp")),
        (rng.standard_normal((4, 4)).astype(np.float16), P("data")),
    ]
    for whole, spec in cases:
        leaf = jax.device_put(whole, NamedSharding(mesh, spec))
        sums = np.zeros(2, np.uint64)
        for shard in leaf.addressable_shards:
            if shard.replica_id == 0:
                data = np.asarray(shard.data)
                index = checkpoints._flat_index(leaf.shape, shard.index, data)
                sums += checkpoints._leaf_digest_host(data, index)
        want = checkpoints._leaf_digest_host(whole)
        np.testing.assert_array_equal((sums % 2**32).astype(np.uint32), want)
        changed = whole.copy()
        changed.flat[-1] = changed.flat[0]
        assert not np.array_equal(checkpoints._leaf_digest_host(changed), want)
