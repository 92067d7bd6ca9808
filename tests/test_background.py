"""sgdgen.runtime.background: helper programs compiled in a thread while a fallback serves."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgdgen.runtime import background


def _wait_for(key, fn, like, store):
    deadline = time.monotonic() + 120
    while (got := background.compiled(key, fn, like, store=store)) is None:
        assert time.monotonic() < deadline, "the background compile never finished"
        time.sleep(0.01)
    return got


def test_none_until_compiled_then_the_program_and_like_is_called_once():
    calls = []
    x = jnp.arange(6.0)

    def like():
        calls.append(1)
        return [background.abstract(x)]

    store: dict = {}
    first = background.compiled(("t", 1), lambda a: a * 2, like, store=store)
    assert first is None or callable(first)  # it may already be done on a fast machine
    program = _wait_for(("t", 1), lambda a: a * 2, like, store)
    np.testing.assert_array_equal(program(x), np.arange(6.0) * 2)
    assert len(calls) == 1 and ("t", 1) in store
    assert background.compiled(("t", 1), lambda a: a * 3, like, store=store) is program  # cached by key


def test_wait_blocks_for_the_program_and_a_failed_compile_raises():
    x = jnp.arange(4.0)
    got = background.compiled(("t", 2), lambda a: a + 1, lambda: [background.abstract(x)], wait=True, store={})
    np.testing.assert_array_equal(got(x), np.arange(4.0) + 1)

    def bad(a):
        raise ValueError("no program here")

    with pytest.raises(ValueError, match="no program here"):
        background.compiled(("t", 3), bad, lambda: [background.abstract(x)], wait=True, store={})


def test_the_abstract_argument_keeps_shape_dtype_and_sharding_not_data():
    x = jax.device_put(np.ones((3, 2), np.float32))
    a = background.abstract(x)
    assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)


def test_ready_runs_other_work_and_drain_waits_for_everything_started():
    """`ready` serves any work (start on the caller's thread, the work in the background), and
    `drain` returns only when every started piece of work is done; a failure stays for the asker."""
    import threading

    gate = threading.Event()
    started = []

    def start():
        started.append(threading.current_thread().name)
        return lambda: gate.wait(30) and "done"

    store: dict = {}
    assert background.ready(("t", 4), start, store=store) is None  # still running: the gate is shut
    assert started == [threading.current_thread().name]
    threading.Timer(0.2, gate.set).start()
    background.drain()
    assert gate.is_set() and background.ready(("t", 4), start, store=store) == "done" and len(started) == 1

    shut = threading.Event()

    def fails():
        shut.wait(30)
        raise RuntimeError("work failed")

    assert background.ready(("t", 5), lambda: fails, store={}) is None
    threading.Timer(0.2, shut.set).start()
    background.drain()  # does not raise: the failure is for whoever asks
    with pytest.raises(RuntimeError, match="work failed"):
        background.ready(("t", 5), lambda: fails, store={})
