"""Helper programs compiled in the background while a fallback serves.

Packing 400 gradients into a bucket, or slicing a bucket into its 400 views, is one small
jitted program that XLA takes seconds to compile (3.5-5.7 s for 400 slices, 14 s for a
6,400-way concatenate, on the 2-core VM): in a fresh process that would dominate the first
step. `compiled(key, ...)` starts that compile in a thread on the first ask and returns None
until it is done; the caller meanwhile uses a path that needs no new program (per-view slices,
a host-side concatenate). The threads are not daemons: a process that ends mid-compile waits
for it (XLA aborts the process when a daemon thread is torn down inside a compile).
`ready(key, start)` does the same for other work (a step program with 6,400 gradient arguments).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

_ready: dict[Hashable, Any] = {}
_pending: dict[Hashable, concurrent.futures.Future] = {}
_lock = threading.Lock()


def compiled(key: Hashable, fn: Callable[..., Any], like: Callable[[], Sequence[Any]], *, wait: bool = False,
             store: dict[Hashable, Any] | None = None, **jit_kwargs: Any) -> Any:
    """The compiled `jax.jit(fn, **jit_kwargs)` for arguments like `like()` (ShapeDtypeStructs;
    called only to start the compile), cached under `key`, which must determine them; None while
    its background compile runs, unless `wait`. A failed compile raises here (to the caller that
    waits, or the next one that asks). `store`: where finished programs are kept (default: for
    the process); an owner passing its own dict frees them with it."""
    return ready(key, jitted(fn, like, **jit_kwargs), wait=wait, store=store)


def jitted(fn: Callable[..., Any], like: Callable[[], Sequence[Any]], **jit_kwargs: Any
           ) -> Callable[[], Callable[[], Any]]:
    """The `start` (for `ready`) of compiling `jax.jit(fn, **jit_kwargs)` for arguments like
    `like()`: the trace's inputs made on the caller's thread, the compile in the background."""

    def start() -> Callable[[], Any]:
        import jax

        program = jax.jit(fn, **jit_kwargs)
        args = list(like())
        return lambda: program.lower(*args).compile()

    return start


def ready(key: Hashable, start: Callable[[], Callable[[], Any]], *, wait: bool = False,
          store: dict[Hashable, Any] | None = None) -> Any:
    """The result of the work `start()` returns (run in a background thread; `start` itself runs
    on the caller's, once), cached under `key`; None while it runs, unless `wait`. A failure
    raises here, to the caller that waits or the next one that asks. `store`: as in `compiled`."""
    finished = _ready if store is None else store
    with _lock:
        done = finished.get(key)
        if done is not None:
            return done
        future = _pending.get(key)
        if future is None:
            work = start()
            future = _pending[key] = concurrent.futures.Future()

            def run() -> None:
                try:
                    future.set_result(work())
                except BaseException as e:  # handed to whoever asks next
                    future.set_exception(e)

            threading.Thread(target=run, name="sgdgen-background-compile").start()
    if not wait and not future.done():
        return None
    result = future.result()
    with _lock:
        finished[key] = result
        _pending.pop(key, None)
    return result


def drain() -> None:
    """Waits for every background compile started so far (a benchmark measuring the steady
    state, a test that needs the compiled program); their failures stay for whoever asks."""
    with _lock:
        pending = list(_pending.values())
    concurrent.futures.wait(pending)


def abstract(x: Any) -> Any:
    """`x`'s shape, dtype and sharding (what a compile needs; not its data, which may be donated)."""
    import jax

    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


__all__ = ["abstract", "compiled", "drain", "jitted", "ready"]
