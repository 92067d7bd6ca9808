"""Flat buckets: many small variables stepped as a few flat buffers.

A step over 400 small tensors pays per buffer (arguments checked, transferred, donated and
freed, one kernel chain each: PERF-NOTES). Bucketing packs the small variables of one
*group* into one flat 1-D buffer, which the program sees as one variable: its momentum,
EMA average and gradient are flat too, so the step takes a handful of arguments and runs a
handful of kernels. The maths does not change, because every rule but the norms is
elementwise and

- the group key holds what differs per variable: dtype and the weight-decay flag;
- `global_clipnorm` sums every gradient's squares anyway (one wide sum over the bucket
  instead of one per member and then their sum: the same value up to the wide type's
  rounding, docs/numerics.md §6);
- `clipnorm` (a norm per variable) is not a flat rule: with it, nothing is bucketed.

What stays its own buffer: variables of `threshold` elements or more (a large tensor gains
nothing, and its forward pass would read a slice of the bucket), and variables not
replicated on every mesh axis (a flat buffer of differently sharded pieces has no global
order). A group of one is left as it is.

One rule, `plan`, decides; `BucketPlan.pack` / `unpack` move values between the
per-variable and the bucketed form (NumPy, or jax.numpy inside a trace).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from sgdgen.frontend.spec import Layout, Mesh, VarSpec

#: Variables of at least this many elements keep their own buffer (256 KiB of float32).
DEFAULT_THRESHOLD = 1 << 16


@dataclass(frozen=True)
class Member:
    """Where one variable lives: bucket `bucket` (an index into `BucketPlan.buckets`), elements
    [offset, offset + size) of it; `own` when the bucket is the variable itself (its shape)."""

    bucket: int
    offset: int
    size: int
    shape: tuple[int, ...]
    own: bool


@dataclass(frozen=True)
class BucketPlan:
    """The variables of a step (`variables`, the user's order) and the program's (`buckets`)."""

    variables: tuple[VarSpec, ...]
    buckets: tuple[VarSpec, ...]
    members: tuple[Member, ...]  # one per variable

    @cached_property
    def contents(self) -> tuple[tuple[int, ...], ...]:
        """Per bucket, the indices of the variables it holds, in offset order."""
        out: list[list[int]] = [[] for _ in self.buckets]
        for i, m in enumerate(self.members):
            out[m.bucket].append(i)
        return tuple(tuple(c) for c in out)

    @cached_property
    def positions(self) -> tuple[int, ...]:
        """Per variable, its index within its bucket's `contents` (offset order)."""
        out = [0] * len(self.members)
        for ks in self.contents:
            for j, k in enumerate(ks):
                out[k] = j
        return tuple(out)

    @property
    def trivial(self) -> bool:
        """Whether every variable keeps its own buffer (the plan changes nothing)."""
        return all(m.own for m in self.members)

    def pack(self, values: Sequence[Any], xp: Any = np) -> list[Any]:
        """The buckets' values from one value per variable (`xp`: numpy or jax.numpy)."""
        if len(values) != len(self.members):
            raise ValueError(f"the plan holds {len(self.members)} variables, got {len(values)} values")
        return [values[ks[0]] if self.members[ks[0]].own else concat([values[k] for k in ks], xp)
                for ks in self.contents]

    def unpack(self, buckets: Sequence[Any], xp: Any = np) -> list[Any]:
        """One value per variable from the buckets' values (static slices, reshaped)."""
        if len(buckets) != len(self.buckets):
            raise ValueError(f"the plan has {len(self.buckets)} buckets, got {len(buckets)} values")
        return [buckets[m.bucket] if m.own else slices(buckets[m.bucket], [(m.offset, m.size, m.shape)])[0]
                for m in self.members]

    def gradient_segments(self, buckets: Sequence[int] | None = None) -> tuple[Any, ...]:
        """Per bucket (of `buckets`, default every one): None for a variable's own buffer, else the
        (name, shape) of each member in offset order: the `gradient_segments` of the program that
        takes a flat bucket's gradient as its members' gradients (`StepABI.create`)."""
        chosen = range(len(self.buckets)) if buckets is None else buckets
        return tuple(None if self.members[self.contents[b][0]].own else
                     tuple((self.variables[k].name, self.variables[k].shape) for k in self.contents[b])
                     for b in chosen)

    def describe(self) -> str:
        """A one-line summary: "412 variables in 9 buffers (3 flat buckets of 405 variables)"."""
        flat = [c for c in self.contents if not self.members[c[0]].own]
        return (f"{len(self.variables)} variables in {len(self.buckets)} buffers ({len(flat)} flat bucket(s) of "
                f"{sum(map(len, flat))} variables)")


def concat(values: Sequence[Any], xp: Any = np, *, out: np.ndarray | None = None) -> Any:
    """One flat bucket from its members' values, in offset order (`xp`: numpy or jax.numpy;
    `out`: a NumPy array to write it into)."""
    flat = [xp.reshape(v, (-1,)) for v in values]
    return xp.concatenate(flat) if out is None else xp.concatenate(flat, out=out)


def slices(flat: Any, members: Sequence[tuple[int, int, tuple[int, ...]]]) -> list[Any]:
    """The members' values of a flat bucket: `members[k] = (offset, size, shape)`; static slices,
    so the same code serves NumPy, jax.Array and traced values."""
    return [flat[o:o + n].reshape(shape) for o, n, shape in members]


def _replicated(layout: Layout) -> bool:
    return all(not d for d in layout.dims)


def bucket_name(dtype: str, decay: bool, k: int, taken: set[str]) -> str:
    """A bucket's variable name, distinct from every variable's ("bucket/float32/0")."""
    name = f"bucket/{dtype}{'' if decay else '/no_decay'}/{k}"
    while name in taken:
        name += "_"
    return name


def plan(variables: Sequence[VarSpec], mesh: Mesh, *, threshold: int = DEFAULT_THRESHOLD,
         per_variable_norms: bool = False) -> BucketPlan:
    """The bucketing of `variables` (see the module docstring). `per_variable_norms`: the
    config clips each gradient by its own norm (`clipnorm`), so nothing is bucketed."""
    if threshold < 1:
        raise ValueError(f"bucket threshold must be a positive number of elements, got {threshold}")
    variables = tuple(variables)
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, v in enumerate(variables):
        if not per_variable_norms and math.prod(v.shape) < threshold and _replicated(v.layout):
            groups.setdefault((v.dtype, v.decay), []).append(i)
    flat_of = {i: key for key, ks in groups.items() if len(ks) > 1 for i in ks}
    taken = {v.name for v in variables}
    buckets: list[VarSpec] = []
    members: list[Member | None] = [None] * len(variables)
    opened: dict[tuple[str, bool], int] = {}
    filled: dict[int, int] = {}  # bucket -> elements placed so far
    for i, v in enumerate(variables):
        key = flat_of.get(i)
        if key is None:
            members[i] = Member(len(buckets), 0, math.prod(v.shape), v.shape, True)
            buckets.append(v)
            continue
        if key not in opened:  # the bucket takes the place of its first member
            total = sum(math.prod(variables[k].shape) for k in groups[key])
            opened[key] = len(buckets)
            name = bucket_name(v.dtype, v.decay, len(opened) - 1, taken)
            taken.add(name)
            buckets.append(VarSpec(name, (total,), v.dtype, Layout.replicated(mesh, 1), v.decay))
        b = opened[key]
        offset = filled.get(b, 0)
        filled[b] = offset + math.prod(v.shape)
        members[i] = Member(b, offset, math.prod(v.shape), v.shape, False)
    return BucketPlan(variables, tuple(buckets), tuple(m for m in members if m is not None))


__all__ = ["DEFAULT_THRESHOLD", "BucketPlan", "Member", "bucket_name", "concat", "plan", "slices"]
