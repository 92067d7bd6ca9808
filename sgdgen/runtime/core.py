"""The functional core: one pure step over the compiled program.

    step = Step(program)                        # a StepProgram: config, variables' specs, mesh
    state = step.init(params)                   # StepState(iterations, momenta, averages)
    params, state = step.apply(state, params, grads, lr)

`Step.apply` is `state, params, grads, lr -> params, state` with no hidden inputs: the
stateful `sgdgen.SGD` is a shell that keeps the arrays between calls, and every other
front end (the JAX primitive, Keras, optax) is an adapter over the same program and
the same `StepABI` (`pack` / `unpack`), so argument order, checking and donation live
in one place. Like a jitted function with `donate_argnums`, it consumes the buffers of
`params` and `state` (they become the results; reading them afterwards raises) and
leaves `grads` and `lr` alone.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sgdgen.codegen.abi import StepABI, StepState
from sgdgen.frontend.zero import pad
from sgdgen.runtime.cache import ExecutableCache, default_cache
from sgdgen.runtime.executable import StepExecutable, put
from sgdgen.runtime.program import StepProgram


_deferring = threading.local()


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Defers SIGINT (Ctrl-C) until the block is done, then delivers it to the handler that was
    installed before (Python's default raises KeyboardInterrupt there).

    A step consumes its donated inputs; a KeyboardInterrupt between the execute call and
    the binding of its results would lose every state array (issue 16.5). `SGD._call`'s step runs
    execute-and-rebind inside this block; a caller of `Step.apply` that keeps the results
    itself can do the same. Only the main thread receives signals, so elsewhere (and when
    nested, or when the handler was not installed from Python) this is a no-op."""
    if (threading.current_thread() is not threading.main_thread() or getattr(_deferring, "on", False)
            or signal.getsignal(signal.SIGINT) is None):
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = False
        signal.signal(signal.SIGINT, previous)
        if pending:
            signal.raise_signal(signal.SIGINT)  # runs `previous` now: KeyboardInterrupt by default


class Step:
    """The optimizer step of one `StepProgram` as a pure function of arrays."""

    def __init__(self, program: StepProgram, cache: ExecutableCache | None = None):
        self.program = program
        self._cache = cache
        self._lr: tuple[bytes, Any] | None = None  # the last learning-rate argument, by value

    @property
    def abi(self) -> StepABI:
        return self.program.abi

    @property
    def executable(self) -> StepExecutable:
        """The compiled step, asked of the cache each time (a dict lookup by the program's
        cached hash), so that the cache's bound and counters stay true."""
        return (self._cache or default_cache()).get(self.program)

    def init(self, params: Sequence[Any], iterations: int = 0) -> StepState:
        """A fresh state for `params`: zero momenta and EMA averages equal to the variables
        (tf_keras' slot initialisers), laid out as each slot (padded where weight-update
        sharding pads it); `iterations` as given; a zero skipped-step counter with skip_nonfinite."""
        abi = self.abi
        n = range(abi.num_variables)
        momenta = tuple(put(abi.slot("momentum", i), np.zeros(abi.slot("momentum", i).shape)) for i in n)
        averages = tuple(put(abi.slot("average", i), pad(abi.slot("average", i).plan, np.asarray(params[i])))
                         for i in n) if abi.use_ema else ()
        skipped = put(abi.slot("skipped", None), 0) if abi.skip_nonfinite else None
        return StepState(put(abi.slot("iterations", None), iterations), momenta, averages, skipped)

    def lr_argument(self, lr: Any) -> Any:
        """The learning-rate argument for a float rate, transferred once per value (not donated)."""
        if not self.abi.lr_input:
            return None
        if hasattr(lr, "sharding"):
            return lr
        value = np.float32(lr)
        key = value.tobytes()
        if self._lr is None or self._lr[0] != key:
            self._lr = (key, put(self.abi.inputs[-1], value))
        return self._lr[1]

    def apply(self, state: StepState, params: Sequence[Any], grads: Sequence[Any], lr: Any = None, *,
              check: bool = True, grads_checked: bool = False) -> tuple[tuple[Any, ...], StepState]:
        """One step: (new params, new state). Every argument is checked first (shape, dtype,
        layout, a donated buffer passed twice): a mismatch raises before anything runs.
        `grads_checked`: the caller has checked the gradients' shapes, dtypes, layouts and that
        they are not deleted (as `sgdgen.SGD` does, with Keras' errors), so they are not checked
        twice; only their buffers are still compared with the donated state's."""
        exe = self.executable
        args = self.abi.pack(state, params, grads, self.lr_argument(lr) if lr is not None else None)
        prechecked = self.abi.gradient_positions if grads_checked else frozenset()
        return self.abi.unpack(exe(args, check=check, prechecked=prechecked))


__all__ = ["Step", "StepState", "uninterruptible"]
