"""A small builder of StableHLO collectives over the axes of one `sdy.mesh`.

Devices are numbered row-major over the mesh axes (meshes without explicit device_ids),
so a device's coordinate on an axis is `(partition_id / stride) % size`, and the replica
groups of a collective "over" some axes are the sets of devices that differ only in their
coordinates on those axes. Every collective gets its own channel handle (numbered from 1
per builder, DEVICE_TO_DEVICE) and `use_global_device_ids`, as Shardy's own lowering emits.

Used by `sgd-insert-collectives` (one all_reduce of the step's norms, one of each gradient that
arrives unreduced, the coordinate masks of replicated partials) and `sgd-shard-weight-update` (device coordinates, `all_gather` of the
updated weights; `reduce_scatter_sum` for gradients that arrive unreduced).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo


class Collectives:
    """Collectives and device coordinates on a mesh given as [(axis name, size), ...]."""

    def __init__(self, axes: Sequence[tuple[str, int]], first_channel: int = 1) -> None:
        self.axes = list(axes)
        self.names = [a for a, _ in self.axes]
        self.sizes = [s for _, s in self.axes]
        self._next_channel = first_channel

    @property
    def device_count(self) -> int:
        return math.prod(self.sizes)

    def replica_groups(self, over: Sequence[str] | None = None) -> np.ndarray:
        """[groups, group size] device ids: devices equal on every axis not in `over` (None: all axes)."""
        over = self.names if over is None else list(over)
        unknown = [a for a in over if a not in self.names]
        if unknown:
            raise ValueError(f"axes {unknown} are not mesh axes {self.names}")
        ids = np.arange(self.device_count, dtype=np.int64).reshape(self.sizes or [1])
        if not self.names:
            return ids.reshape(1, 1)
        keep = [i for i, a in enumerate(self.names) if a not in over]
        moved = [self.names.index(a) for a in over]
        return np.ascontiguousarray(ids.transpose(keep + moved).reshape(-1, math.prod(self.sizes[i] for i in moved)))

    def _channel(self) -> ir.Attribute:
        handle = self._next_channel
        self._next_channel += 1
        return ir.Attribute.parse(f"#stablehlo.channel_handle<handle = {handle}, type = 1>")

    def _groups_attr(self, over: Sequence[str] | None) -> ir.Attribute:
        return ir.DenseElementsAttr.get(self.replica_groups(over))

    @staticmethod
    def _sum_region(op: ir.OpView, element_type: ir.Type) -> None:
        scalar = ir.RankedTensorType.get([], element_type)
        block = op.regions[0].blocks.append(scalar, scalar)
        with ir.InsertionPoint(block):
            stablehlo.return_([stablehlo.add(block.arguments[0], block.arguments[1])])

    def all_reduce_sum(self, v: ir.Value, over: Sequence[str] | None = None) -> ir.Value:
        """Sum of `v` over the devices of each group (None: every device of the mesh)."""
        t = ir.RankedTensorType(v.type)
        op = stablehlo.AllReduceOp([t], [v], self._groups_attr(over), channel_handle=self._channel(),
                                   use_global_device_ids=True)
        self._sum_region(op, t.element_type)
        return op.results[0]

    def _split(self, t: ir.RankedTensorType, dim: int, factor: int, gather: bool) -> ir.Type:
        shape = list(t.shape)
        if not gather and shape[dim] % factor:
            raise ValueError(f"dimension {dim} of size {shape[dim]} is not divisible by {factor}")
        shape[dim] = shape[dim] * factor if gather else shape[dim] // factor
        return ir.RankedTensorType.get(shape, t.element_type)

    def reduce_scatter_sum(self, v: ir.Value, dim: int, over: str) -> ir.Value:
        """Sum over axis `over`, each device keeping its 1/size block of dimension `dim`."""
        t = ir.RankedTensorType(v.type)
        result = self._split(t, dim, self.sizes[self.names.index(over)], gather=False)
        op = stablehlo.ReduceScatterOp(result, v, dim, self._groups_attr([over]), channel_handle=self._channel(),
                                       use_global_device_ids=True)
        self._sum_region(op, t.element_type)
        return op.result

    def all_gather(self, v: ir.Value, dim: int, over: str) -> ir.Value:
        """The blocks of every device along axis `over`, concatenated on dimension `dim`."""
        t = ir.RankedTensorType(v.type)
        result = self._split(t, dim, self.sizes[self.names.index(over)], gather=True)
        op = stablehlo.AllGatherOp([result], [v], dim, self._groups_attr([over]), channel_handle=self._channel(),
                                   use_global_device_ids=True)
        return op.results[0]

    @staticmethod
    def _u32(x: int) -> ir.Value:
        u32 = ir.IntegerType.get_unsigned(32)
        return stablehlo.constant(ir.DenseElementsAttr.get_splat(ir.RankedTensorType.get([], u32),
                                                                 ir.IntegerAttr.get(u32, x)))

    def coordinate(self, pid: ir.Value, axis: str) -> ir.Value:
        """ui32 scalar: this device's (`pid`, a ui32 partition_id) coordinate on `axis`."""
        i = self.names.index(axis)
        return stablehlo.remainder(stablehlo.divide(pid, self._u32(math.prod(self.sizes[i + 1:]))),
                                   self._u32(self.sizes[i]))

    def is_first(self, pid: ir.Value, axes: Sequence[str]) -> ir.Value | None:
        """i1 scalar: this device (`pid`, a ui32 partition_id) is at coordinate 0 of every axis in `axes`."""
        const = self._u32
        pred = None
        for a in axes:
            coord = self.coordinate(pid, a)
            is_zero = stablehlo.compare(coord, const(0),
                                        comparison_direction=stablehlo.ComparisonDirectionAttr.get("EQ"))
            pred = is_zero if pred is None else stablehlo.and_(pred, is_zero)
        return pred
