"""Compile a step module for a mesh and run it on jax.Arrays laid out on that mesh.

`StepExecutable` pairs a compiled PJRT executable with its `StepABI`: it knows every
argument's global shape, dtype and `NamedSharding`, checks the arrays it is given
against them before anything runs (a mismatch that reaches PJRT on several devices
ends the process, RUNTIME-NOTES Q1), and wraps the results as jax.Arrays with the
right shardings. State arguments are donated: their buffers become the results.

No two arguments may share a device buffer with a donated one (issue 16.4: a gradient
rebuilt from a variable's shards ended the process). The check compares the shards'
buffer addresses; a result's addresses are its donated argument's (the step updates it
in place, verified on the first call), so a state fed back from the previous step costs
a dictionary lookup and only new arrays (the gradients) are asked for their addresses.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgdgen import backend
from sgdgen.codegen.abi import Slot, StepABI
from sgdgen.errors import BackendError, StepInputError
from sgdgen.frontend.spec import Mesh, numpy_dtype
from sgdgen.runtime import cpu_kernels

_MEMO_LIMIT = 1024


class ShardingMatcher:
    """`have.is_equivalent_to(want, ndim)`, memoised per owner (shardings are immutable and
    hashable, and every step asks the same questions); bounded, and owned by whoever uses it."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, Any, int], bool] = {}

    def __call__(self, have: Any, want: Any, ndim: int) -> bool:
        if have is want:
            return True
        key = (have, want, ndim)
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            hit = self._memo[key] = bool(have.is_equivalent_to(want, ndim))
        return hit


def put(slot: Slot, value: Any) -> Any:
    """A fresh device array of `value` in the slot's dtype and layout: always a copy (a NumPy view
    of a jax.Array placed zero-copy would share the buffer the step donates; `backend.device_put`)."""
    return backend.device_put(np.asarray(value, dtype=slot_dtype(slot)), slot.layout.named_sharding())


def slot_dtype(slot: Slot) -> np.dtype:
    return numpy_dtype(slot.dtype)


@dataclass
class StepExecutable:
    """A compiled step for one mesh, with its calling convention."""

    executable: Any
    abi: StepABI
    mesh: Mesh
    equivalent: ShardingMatcher = field(default_factory=ShardingMatcher, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: the per-step path only compares against these.
        # One NamedSharding object per layout (spec.Layout.named_sharding caches them), so that
        # a result fed back as the next step's argument passes the check by identity.
        self.in_shardings = [s.layout.named_sharding() for s in self.abi.inputs]
        self.out_shardings = [s.layout.named_sharding() for s in self.abi.outputs]
        self.out_avals = [backend.shaped_array(s.shape, slot_dtype(s)) for s in self.abi.outputs]
        self._handlers = backend.result_handlers(self.out_shardings, self.out_avals)  # reused by every call
        self.in_dtypes = [slot_dtype(s) for s in self.abi.inputs]
        donated = set(self.abi.donated)
        self.in_donated = [k in donated for k in range(len(self.abi.inputs))]
        self._kept = tuple(k for k, d in enumerate(self.in_donated) if not d)  # arguments read, not donated
        self._unchecked: dict[frozenset[int], tuple[int, ...]] = {}  # prechecked positions -> the others
        self.in_sizes = [math.prod(s.shape) for s in self.abi.inputs]
        # positions laid out on one device: a checked argument there has one buffer, asked directly
        self._one_device = [len(s.device_set) == 1 for s in self.in_shardings]
        # id(array) -> (weakref to it, its shards' buffer addresses): the last call's results
        # (which own their donated arguments' buffers) and its non-donated arguments. Replaced
        # whole after each call (bounded by the argument count); an entry counts only while
        # its weakref still names that very array.
        # id -> (weakref, shard buffer addresses, the argument position it was checked for)
        self._known: dict[int, tuple[Any, tuple[int, ...], int]] = {}
        self._results_alias: bool | None = None  # results keep their arguments' buffers (seen on a call)

    @classmethod
    def compile(cls, text: str, abi: StepABI, mesh: Mesh, *, in_place: bool = True) -> StepExecutable:
        """Compiles StableHLO text for `mesh`'s devices.

        With `in_place` (the default) the executable must alias every state buffer,
        as the lowered module does; stage 0 (no aliasing yet) needs `in_place=False`.
        """
        exe = cpu_kernels.compile_text(text, backend.devices_for(mesh.device_ids))
        return cls.wrap(exe, abi, mesh, in_place=in_place)

    @classmethod
    def wrap(cls, executable: Any, abi: StepABI, mesh: Mesh, *, in_place: bool = True) -> StepExecutable:
        """An already compiled (or loaded) executable with its calling convention; with
        `in_place`, refused unless it aliases every state buffer."""
        step = cls(executable, abi, mesh)
        if in_place:
            step.require_in_place()
        return step

    def require_in_place(self) -> None:
        """Refuses an executable in which some state buffer is not updated in place.

        DESIGN: in-place update is guaranteed, not hoped for. A missing alias would
        silently double the state's memory; this makes it an error instead.
        """
        have = backend.input_output_aliases(self.executable)
        missing = [self.abi.outputs[k].name for k, a in self.abi.aliases.items() if have.get(k) != a]
        if missing:
            raise BackendError(
                f"the compiled step does not update {len(missing)} state buffer(s) in place "
                f"(first: {missing[0]!r}); compile the lowered module (sgd-alias-buffers marks "
                "tf.aliasing_output on every state argument)")

    def put(self, slot: Slot, value: Any) -> Any:
        """Places a host value (or an array) as the step expects this slot."""
        return put(slot, value)

    def check(self, args: Sequence[Any], prechecked: frozenset[int] = frozenset()) -> tuple[int, ...]:
        """Raises StepInputError naming the slot and the fix if any argument does not match.

        Each argument's shape, dtype and layout is checked once: not again when it is this
        executable's own result of the previous call fed back to the same position, or was
        given to that position last call. Whether it is deleted and unique among the donated
        arguments is checked every time, and every argument's buffers are checked against the
        donated ones. Positions in `prechecked` (non-donated arguments the caller has checked
        for shape, dtype, layout and liveness, e.g. `sgdgen.SGD`'s gradients) are only checked
        for shared buffers.

        Returns the indices of non-donated arguments (gradients) that share a device buffer
        with a donated one: the step runs on a copy of those (`__call__` makes it)."""
        return self._check(args, prechecked)[0]

    def _check(self, args: Sequence[Any], prechecked: frozenset[int] = frozenset()
               ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        if len(args) != len(self.abi.inputs):
            raise StepInputError(f"the step takes {len(self.abi.inputs)} arguments, got {len(args)}")
        seen: dict[int, int] = {}  # id -> the donated position that holds it (untrusted arguments only)
        known, inputs, donated = self._known, self.abi.inputs, self.in_donated
        positions = self._unchecked.get(prechecked)
        if positions is None:
            positions = self._unchecked[prechecked] = tuple(k for k in range(len(inputs)) if k not in prechecked)
        for k in positions:  # per step: no string is formatted and no closure made unless something is wrong
            a = args[k]
            deleted = getattr(a, "is_deleted", None)
            if deleted is not None and deleted():
                raise StepInputError(f"{inputs[k].role} {inputs[k].name!r}: the array was donated to an earlier "
                                     "step and is deleted; pass the array that step returned")
            entry = known.get(id(a))
            if entry is not None and entry[2] == k and entry[0]() is a:
                continue  # this position's own array of the last call: checked then, and (one position per
                # remembered array) held by no other position that is trusted too
            self._check_slot(k, a)
            if donated[k]:  # a donated buffer must be unique among the arguments
                j = seen.setdefault(id(a), k)
                if j == k and entry is not None and donated[entry[2]] and entry[0]() is a and args[entry[2]] is a:
                    j = entry[2]  # the array is also at the (donated) position it was remembered for
                if j != k:
                    other = inputs[j]
                    raise StepInputError(f"{inputs[k].role} {inputs[k].name!r}: the same array is also passed as "
                                         f"{other.role} {other.name!r}; a donated state buffer cannot be passed "
                                         "twice: pass distinct arrays")
        pointers = self._pointers(args)
        try:
            return self._shared(pointers), pointers
        except StepInputError:
            # Remembered addresses can be stale: a result is assumed to live in its donated
            # argument's buffer, but PJRT copies instead when something else held that buffer (a
            # NumPy view from np.asarray), and the old address may since belong to another array.
            # Ask every argument for its addresses before refusing; forget the assumption.
            self._results_alias = False
            fresh = [backend.buffer_pointers(a) if size else () for a, size in zip(args, self.in_sizes)]
            return self._shared(fresh), fresh

    def _check_slot(self, k: int, a: Any) -> None:
        """Argument `a` at position k has the slot's shape, dtype and layout, or an error naming it."""
        slot, want, want_dtype = self.abi.inputs[k], self.in_shardings[k], self.in_dtypes[k]
        what = f"{slot.role} {slot.name!r}"
        shape, dtype = tuple(getattr(a, "shape", ())), np.dtype(getattr(a, "dtype", None))
        if shape != slot.shape:
            raise StepInputError(f"{what}: shape {list(shape)} does not match the compiled {list(slot.shape)}")
        if dtype != want_dtype:
            raise StepInputError(f"{what}: dtype {dtype} does not match the compiled {want_dtype}; "
                                 f"cast it with .astype({want_dtype})")
        have = getattr(a, "sharding", None)
        if have is None or not self.equivalent(have, want, len(shape)):
            raise StepInputError(f"{what}: laid out as {have}, but the step expects {want}; "
                                 "jax.device_put it with that sharding")

    def _pointers(self, args: Sequence[Any]) -> list[tuple[int, ...]]:
        """Each argument's shard buffer addresses (none for an empty array: it has no memory)."""
        known = self._known
        out: list[tuple[int, ...]] = []
        for a, size, one in zip(args, self.in_sizes, self._one_device):
            entry = known.get(id(a))
            if entry is not None and entry[0]() is a:
                out.append(entry[1])
            else:  # checked to have the position's sharding: one device means one address, asked directly
                out.append(backend.buffer_pointers(a, one) if size else ())
        return out

    def _shared(self, pointers: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """Refuses two donated arguments that share a buffer; returns the non-donated arguments that share one with a donated argument."""
        inputs = self.abi.inputs
        owner: dict[int, int] = {}  # buffer address -> the donated argument holding it
        for k in self.abi.donated:
            # One buffer on several devices of one array (a zero-copy transfer of one host array)
            # is PJRT's to handle: it does not donate a buffer that is held twice.
            for p in pointers[k]:
                j = owner.setdefault(p, k)
                if j != k:
                    raise StepInputError(
                        f"{inputs[k].role} {inputs[k].name!r} shares a device buffer with {inputs[j].role} "
                        f"{inputs[j].name!r}; the step updates both in place, so they must be distinct buffers: "
                        "pass a copy of one (jax.numpy.array(x, copy=True))")
        kept = self._kept
        if owner.keys().isdisjoint(itertools.chain.from_iterable(pointers[k] for k in kept)):
            return ()  # the usual answer, in one pass over every kept argument's addresses
        return tuple(k for k in kept if not owner.keys().isdisjoint(pointers[k]))

    def __call__(self, args: Sequence[Any], *, check: bool = True, prechecked: frozenset[int] = frozenset()
                 ) -> list[Any]:
        """Runs one step; returns the new state in `abi.outputs` order.

        With `check`, arguments are checked first (nothing runs on a mismatch), and a
        gradient that shares a buffer with donated state is copied before the step."""
        if not check:
            return backend.execute(self.executable, args, self.out_shardings, self.out_avals, handlers=self._handlers)
        args = list(args)
        copies, pointers = self._check(args, prechecked)
        for k in copies:
            args[k] = backend.copy_array(args[k])
        results = backend.execute(self.executable, args, self.out_shardings, self.out_avals, handlers=self._handlers)
        self._remember(args, results, pointers, set(copies))
        return results

    def _remember(self, args: Sequence[Any], results: Sequence[Any], pointers: Sequence[tuple[int, ...]],
                  copied: set[int]) -> None:
        """Keeps the buffer addresses of this call's results and kept arguments for the next check.

        A result lives in its argument's buffer when that argument was donated, i.e. is now
        deleted; PJRT keeps (and copies) a buffer that something else still holds, such as a
        NumPy view from `np.asarray(x)` of a replicated array, so such a result is asked for
        its own addresses. The rule is checked against every result on each call until one call
        shows it: on CPU the first step after a host transfer may not reuse every donated buffer,
        and deciding on that call alone would ask every result for its addresses forever."""
        aliases, sizes = self.abi.aliases, self.in_sizes
        if not self._results_alias:
            self._results_alias = all(backend.buffer_pointers(results[o]) == pointers[i]
                                      for o, i in aliases.items() if sizes[i] and args[i].is_deleted())
        known: dict[int, tuple[Any, tuple[int, ...]]] = {}
        for o, i in aliases.items():
            r = results[o]
            inherited = self._results_alias and args[i].is_deleted()
            known[id(r)] = (weakref.ref(r), pointers[i] if inherited else
                            backend.buffer_pointers(r) if sizes[i] else (), i)
        for k, donated in enumerate(self.in_donated):
            if not donated and k not in copied:
                known[id(args[k])] = (weakref.ref(args[k]), pointers[k], k)
        self._known = known

    def hlo_text(self) -> str:
        return backend.hlo_text(self.executable)
