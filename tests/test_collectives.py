"""sgdgen.passes.collectives: replica groups follow the row-major device numbering, and each
builder emits a collective that verifies inside a manual computation on local shapes."""

from __future__ import annotations

import numpy as np
import pytest
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func, sdy

from sgdgen.codegen.ir import make_context
from sgdgen.passes.collectives import Collectives

AXES = [("x", 2), ("y", 4), ("z", 3)]


def _coords(device: int) -> dict[str, int]:
    """Row-major coordinates of a device id, computed independently of the builder."""
    sizes = [s for _, s in AXES]
    out = {}
    for (name, _), c in zip(AXES, np.unravel_index(device, sizes)):
        out[name] = int(c)
    return out


@pytest.mark.parametrize("over", [None, ["x"], ["y"], ["z"], ["x", "z"], ["y", "x"]])
def test_replica_groups_are_devices_equal_off_the_chosen_axes(over: list[str] | None) -> None:
    groups = Collectives(AXES).replica_groups(over)
    axes = [a for a, _ in AXES] if over is None else over
    n = int(np.prod([s for _, s in AXES]))
    assert sorted(groups.reshape(-1).tolist()) == list(range(n))  # a partition of the devices
    for g in groups:
        others = [{a: c for a, c in _coords(int(d)).items() if a not in axes} for d in g]
        assert all(o == others[0] for o in others)
        # within a group, devices are ordered by their coordinates on `over`, in its order
        keys = [tuple(_coords(int(d))[a] for a in axes) for d in g]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_groups_of_meshes_without_axes_and_errors() -> None:
    assert Collectives([]).replica_groups().tolist() == [[0]]
    with pytest.raises(ValueError, match=r"\['w'\] are not mesh axes"):
        Collectives(AXES).replica_groups(["w"])


def test_builders_emit_verifying_collectives_with_distinct_channels() -> None:
    ctx = make_context()
    with ctx, ir.Location.unknown():
        module = ir.Module.parse('sdy.mesh @mesh = <["x"=2, "y"=4, "z"=3]>')
        f32 = ir.F32Type.get()
        glob = ir.RankedTensorType.get([8, 12], f32)
        local = ir.RankedTensorType.get([4, 3], f32)
        sh = ir.Attribute.parse('#sdy.sharding_per_value<[<@mesh, [{"x"}, {"y"}]>]>')
        with ir.InsertionPoint(module.body):
            fn = func.FuncOp("main", ir.FunctionType.get([glob], [glob]))
            entry = fn.add_entry_block()
        with ir.InsertionPoint(entry):
            mc = sdy.ManualComputationOp([glob], [entry.arguments[0]], sh, sh,
                                         sdy.ManualAxesAttr.get([ir.StringAttr.get(a) for a, _ in AXES]))
            inner = mc.regions[0].blocks.append(local)
            func.ReturnOp(list(mc.results))
        c = Collectives(AXES)
        with ir.InsertionPoint(inner):
            v = inner.arguments[0]
            summed = c.all_reduce_sum(v, ["z"])
            scattered = c.reduce_scatter_sum(summed, 0, "x")  # 4x3 -> 2x3
            gathered = c.all_gather(scattered, 0, "x")  # back to 4x3
            sdy.ReturnOp([gathered])
        module.operation.verify()
        text = str(module)
    assert "tensor<2x3xf32>" in text and text.count("#stablehlo.channel_handle<") == 3
    for handle in (1, 2, 3):
        assert f"handle = {handle}," in text
    with ctx, ir.Location.unknown(), ir.InsertionPoint(inner.operations[0]):
        with pytest.raises(ValueError, match="dimension 1 of size 3 is not divisible by 4"):
            c.reduce_scatter_sum(inner.arguments[0], 1, "y")

