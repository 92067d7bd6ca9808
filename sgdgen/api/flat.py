"""The stateful optimizer's flat buckets (`sgdgen.SGD(buckets=True)`).

`sgdgen.frontend.buckets.plan` decides which variables share a flat buffer; this module
holds those buffers for `sgdgen.SGD`: per flat bucket, one `FlatBuffer` per role (the
variables' values, the momenta, the EMA averages), of which the user's Variables and the
optimizer's slot Variables are views. A step then takes one argument per bucket and role
instead of one per variable (PERF-NOTES "Flat buffers").

Per-variable gradients reach a flat bucket in one of two ways:
- on CPU with sgdgen's kernels, the step's program takes them as they are, as the segments of
  the bucket's gradient (`StepABI` gradient_segments), and its kernels read each where it lies:
  no packed copy is ever written (12.8 MB a step for 3.2M parameters). That program (one
  argument per member) compiles in the background from the second step; until then, and in a
  one-step process, the gradients are packed on the host;
- elsewhere (no kernels to read segments, where XLA would materialise the concatenate inside
  the program anyway), one jitted packer per set of buckets (cached) packs them outside the
  compiled step, which takes flat gradients.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgdgen.api.variable import FlatBuffer, Variable
from sgdgen.codegen.abi import StepABI
from sgdgen.frontend.buckets import BucketPlan, concat
from sgdgen.frontend.zero import pad
from sgdgen.runtime.executable import put, slot_dtype

_tokens = itertools.count()

#: The state roles a flat bucket keeps a buffer for (the ABI's slot roles).
ROLES = ("variable", "momentum", "average")


@dataclass
class Buckets:
    """A built optimizer's flat buckets: `plan` over its tracked variables, `abi` the
    convention of the program over all of `plan.buckets`, `buffers[b]` the role -> buffer
    map of flat bucket b (None for a variable that keeps its own buffer)."""

    plan: BucketPlan
    abi: StepABI
    buffers: list[dict[str, FlatBuffer] | None]
    _grad_shardings: dict[tuple[int, ...], Any] = field(default_factory=dict)  # buckets -> their gradients' shardings
    _whole: dict[tuple[Any, ...], bool] = field(default_factory=dict)
    _calls: dict[tuple[Any, ...], int] = field(default_factory=dict)
    _programs: dict[Any, Any] = field(default_factory=dict)  # compiled packers and steps, freed with these buckets
    _failed: set[tuple[Any, ...]] = field(default_factory=set)  # segment steps that could not be built: packed
    _token: int = field(default_factory=lambda: next(_tokens))  # this object's part of a pending compile's key

    @classmethod
    def create(cls, plan: BucketPlan, abi: StepABI, variables: Sequence[Variable]) -> Buckets:
        """The buffers of every flat bucket, filled from `variables` (the plan's order): their
        values packed, zero momenta, averages equal to the values. Makes each member a view."""
        buffers: list[dict[str, FlatBuffer] | None] = []
        for b, ks in enumerate(plan.contents):
            if plan.members[ks[0]].own:
                buffers.append(None)
                continue
            members = [(plan.members[k].offset, plan.members[k].size, plan.members[k].shape) for k in ks]
            shardings = [variables[k].layout.named_sharding() for k in ks]
            packed = concat([variables[k].numpy() for k in ks])
            roles = {"variable": put(abi.slot("variable", b), packed),
                     "momentum": put(abi.slot("momentum", b), np.zeros(abi.slot("momentum", b).shape,
                                                                          slot_dtype(abi.slot("momentum", b))))}
            if abi.use_ema:
                roles["average"] = put(abi.slot("average", b), pad(abi.slot("average", b).plan, packed))
            buffers.append({r: FlatBuffer(a, members, shardings) for r, a in roles.items()})
        for b, ks in enumerate(plan.contents):
            if buffers[b] is not None:
                for j, k in enumerate(ks):
                    variables[k]._view_of(buffers[b]["variable"], j)
        return cls(plan, abi, buffers)

    def flat(self, b: int) -> bool:
        return self.buffers[b] is not None

    def where(self, k: int) -> tuple[int, int]:
        """(bucket, position within the bucket) of variable k."""
        return self.plan.members[k].bucket, self.plan.positions[k]

    def gradients(self, buckets: Sequence[int], grads: Sequence[Sequence[Any]], segmented: Any = None
                  ) -> tuple[bool, list[Any]]:
        """What the step takes for flat `buckets`, from their members' gradients (`grads[i]`:
        bucket `buckets[i]`'s, in offset order): (True, `grads` as they are) once `segmented`'s
        program (it takes them as gradient segments) is built, else (False, one packed gradient per
        bucket). While that program compiles, the host packs; if it cannot be built, one warning
        and the packer serves from then on (an optimisation never stops training)."""
        key = ("segments", *buckets)
        if segmented is None or key in self._failed:
            return False, self.pack_gradients(buckets, grads)
        from sgdgen.runtime import cpu_kernels

        def start() -> Any:  # the passes (MLIR) on this thread; XLA's compile in the background
            cpu_kernels.rewrite(segmented.program.lowered_text)
            return lambda: segmented.executable

        try:
            if self._helper(key, grads, start) is not None:
                return True, list(grads)
        except Exception as e:
            self._failed.add(key)
            warnings.warn(f"sgdgen: the step that takes the flat buckets' gradients as segments could not be built "
                          f"({type(e).__name__}: {e}); packing the gradients instead, as without sgdgen's CPU "
                          "kernels (SGDGEN_CPU_KERNELS=0 skips it)", RuntimeWarning, stacklevel=4)
            return False, self.pack_gradients(buckets, grads)
        return False, self._host_pack(grads, self._shardings(buckets))

    def _helper(self, key: tuple[Any, ...], grads: Sequence[Sequence[Any]], start: Any) -> Any:
        """The helper program of `key` (a packer, a step taking segments), started by `start` (see
        `background.ready`), or None while it is not there: never built in a one-step process, and
        from the second call compiled in the background (hundreds of inputs: seconds) where this
        process holds every gradient whole, else waited for (the host cannot pack across processes)."""
        from sgdgen.runtime import background

        whole = self._whole.get(key)
        if whole is None:  # whether this process holds every gradient whole (not so across processes)
            whole = self._whole[key] = all(getattr(g, "is_fully_addressable", True) for gs in grads for g in gs)
        calls = self._calls[key] = self._calls.get(key, 0) + 1
        if whole and calls == 1:  # a one-step process never pays for the compile
            return None
        return background.ready((key[0], self._token, key), start, wait=not whole, store=self._programs)

    def _shardings(self, buckets: Sequence[int]) -> tuple[Any, ...]:
        """The flat gradients' shardings of these buckets (computed once per set)."""
        key = tuple(buckets)
        shardings = self._grad_shardings.get(key)
        if shardings is None:
            shardings = self._grad_shardings[key] = tuple(self.abi.inputs[self.abi.index("gradient", b)].layout
                                                   .named_sharding() for b in key)
        return shardings

    def pack_gradients(self, buckets: Sequence[int], grads: Sequence[Sequence[Any]]) -> list[Any]:
        """The flat gradients of flat `buckets` from their members' gradients (`grads[i]`: bucket
        `buckets[i]`'s, in offset order): one jitted call, compiled once per set of buckets. While
        that program is not there (`_helper`), arrays this process holds whole are packed on the
        host instead (a concatenate of NumPy views on CPU)."""
        from sgdgen.runtime import background

        shardings = self._shardings(buckets)
        flat_in = [g for gs in grads for g in gs]
        sizes = tuple(len(g) for g in grads)

        def pack(*flat: Any) -> tuple[Any, ...]:
            import jax.numpy as jnp

            starts = np.cumsum((0, *sizes))
            return tuple(concat(flat[a:b], jnp) for a, b in zip(starts[:-1], starts[1:]))

        # SGD has checked every gradient against its variable (shape, dtype, layout): the buckets
        # and this object determine the program's inputs, so the key hashes nothing per variable
        fn = self._helper(("pack", *buckets), grads, background.jitted(
            pack, lambda: [background.abstract(g) for g in flat_in], out_shardings=shardings))
        if fn is not None:
            return list(fn(*flat_in))
        return self._host_pack(grads, shardings)

    @staticmethod
    def _host_pack(grads: Sequence[Sequence[Any]], shardings: Sequence[Any]) -> list[Any]:
        """The flat gradients through the host: NumPy views (on CPU) concatenated into a 64-byte
        aligned buffer of its own, which a CPU device array then wraps (no second copy: the step
        reads a gradient and never donates it); elsewhere one transfer each."""
        from sgdgen import backend

        return backend.put_host([_concat_aligned([np.asarray(g) for g in gs]) for gs in grads], shardings, share=True)

    def unpack(self, b: int, flat: Any) -> list[Any]:
        """The members' arrays of flat bucket b from one flat array (one jitted call, cached)."""
        return self.buffers[b]["variable"].unpack(flat)

    def slot_view(self, k: int, role: str, name: str) -> Variable:
        """Variable k's slot of `role` ("momentum" / "average") as a view of its bucket's buffer."""
        b, j = self.where(k)
        v = self.plan.variables[k]
        buffer = self.buffers[b][role]
        return Variable.view(buffer, j, name=name, layout=v.layout)


def _concat_aligned(values: Sequence[np.ndarray], align: int = 64) -> np.ndarray:
    """`concat(values)` into a new array that starts on an `align`-byte boundary (what PJRT's CPU
    client needs to use host memory as a device buffer without copying it)."""
    dtype = np.result_type(*values)
    n = sum(v.size for v in values)
    raw = np.empty(n * dtype.itemsize + align, np.uint8)
    start = -raw.ctypes.data % align
    return concat(values, out=raw[start:start + n * dtype.itemsize].view(dtype))


def assign_all(owners: Sequence[Variable], values: Sequence[Any]) -> None:
    """Each owner takes its new value: its own buffer is rebound (no copy); views of a flat
    bucket are written into it, one write per buffer however many of its views change."""
    writes: dict[int, tuple[FlatBuffer, dict[int, Any]]] = {}
    for owner, value in zip(owners, values, strict=True):
        buffer = owner._view
        if buffer is not None:
            writes.setdefault(id(buffer), (buffer, {}))[1][owner._view_index] = value
        else:
            owner._bind(value)
    for buffer, vals in writes.values():
        buffer.write(vals)


__all__ = ["Buckets", "ROLES", "assign_all"]
