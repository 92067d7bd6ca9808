"""Automatic garbage collection paused while sgdgen builds thousands of objects at once.

Building an optimizer (or loading one) makes a few objects per variable and slot: tens of
thousands at 6,400 variables. Each burst lets CPython's collector run full collections of
the whole heap, jax's included: 2 of them took 1.45 s of a 9.4 s first step on 8 devices
(`bench/first_step.py --devices 8`). What these calls create is held, not garbage, and forms
no cycles that need collecting, so collection is deferred to after them, not skipped.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection inside; the collector's previous state restored on exit."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
