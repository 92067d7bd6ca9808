"""Weight-update sharding (ZeRO-1/2) layouts: where a variable's optimizer slots live.

One rule, shared by the calling convention (`sgdgen.codegen.abi`, which gives the slots
their own shape and layout) and the pass that rewrites the step
(`sgd-shard-weight-update`), so that the two can never disagree:

- a variable of rank >= 1 replicated over the data axis (size N > 1) gets slots divided
  over it: on the first dimension whose per-device size divides by N, that axis is added
  as the minor axis of the dimension (each device keeps 1/N of its own shard);
- where no dimension divides, dimension 0 is padded (per device, at its end) to a multiple
  of N; the padding holds zeros and is never shown to the user (`unpad` drops it);
- scalars and variables already sharded over the axis keep the variable's layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass

import numpy as np

#: Per dimension, the mesh axes that shard it (major to minor), as `Layout.dims`.
Dims = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ShardPlan:
    """How one variable's slots are divided over `axis`."""

    axis: str
    factor: int  # N, the size of the axis
    dim: int  # the dimension divided over the axis
    local: tuple[int, ...]  # the variable's per-device shape
    padded_local: tuple[int, ...]  # that shape with `dim` padded to a multiple of N
    slot_shape: tuple[int, ...]  # the slot's global (padded) shape
    slot_dims: Dims  # the slot's layout

    @property
    def padded(self) -> bool:
        return self.padded_local != self.local

    @property
    def slot_local(self) -> tuple[int, ...]:
        """One device's slot shard: 1/N of the padded local shape along `dim`."""
        s = list(self.padded_local)
        s[self.dim] //= self.factor
        return tuple(s)

    @property
    def outer(self) -> int:
        """How many blocks the other axes cut `dim` into (each padded on its own)."""
        return self.slot_shape[self.dim] // self.padded_local[self.dim]


def shard_plan(shape: Sequence[int], dims: Dims, sizes: Mapping[str, int], axis: str) -> ShardPlan | None:
    """The plan for a variable of `shape` laid out as `dims`, or None when it is left alone
    (a scalar, already sharded over `axis`, or an axis of size 1)."""
    n = sizes[axis]
    if not shape or n == 1 or any(axis in d for d in dims):
        return None
    local = tuple(s // math.prod(sizes[a] for a in d) for s, d in zip(shape, dims))
    dim = next((i for i, s in enumerate(local) if s % n == 0), 0)
    padded_local = list(local)
    padded_local[dim] = -(-local[dim] // n) * n
    slot_shape = list(shape)
    slot_shape[dim] = padded_local[dim] * (shape[dim] // local[dim])
    slot_dims = tuple(d + (axis,) if i == dim else d for i, d in enumerate(dims))
    return ShardPlan(axis, n, dim, local, tuple(padded_local), tuple(slot_shape), slot_dims)


def unpad(plan: ShardPlan | None, value: Any, xp: Any = np) -> Any:
    """A slot's logical value (the variable's shape) from its padded global value.
    `xp`: the array module (numpy, or jax.numpy for device arrays)."""
    if plan is None or not plan.padded:
        return value
    d, outer = plan.dim, plan.outer
    blocks = value.reshape(value.shape[:d] + (outer, plan.padded_local[d]) + value.shape[d + 1:])
    kept = xp.take(blocks, xp.arange(plan.local[d]), axis=d + 1)
    return kept.reshape(value.shape[:d] + (outer * plan.local[d],) + value.shape[d + 1:])


def pad(plan: ShardPlan | None, value: Any, xp: Any = np) -> Any:
    """The inverse of `unpad`: a logical slot value laid out in the slot's padded shape (zeros).
    `xp`: the array module (numpy, or jax.numpy to pad traced values)."""
    if plan is None or not plan.padded:
        return value
    d, outer = plan.dim, plan.outer
    blocks = value.reshape(value.shape[:d] + (outer, plan.local[d]) + value.shape[d + 1:])
    widths = [(0, 0)] * blocks.ndim
    widths[d + 1] = (0, plan.padded_local[d] - plan.local[d])
    padded = xp.pad(blocks, widths)
    return padded.reshape(plan.slot_shape)
