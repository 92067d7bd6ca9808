"""Where a module's values are this device's own: the blocks a CPU kernel call may read.

An FFI call is opaque to XLA's partitioner, which knows no sharding rule for it and would
gather a sharded operand whole. So the CPU-kernel passes rewrite only local code: the body of
@main in a module of one partition (`mhlo.num_partitions = 1`, or none), or the body of an
`sdy.manual_computation` that is manual over every axis of the mesh (what
`sgd-insert-collectives` builds). A stage-0 module on several devices has no local block.
Also here: how a local block's arguments and results reach @main's, for in-place aliasing.
"""

from __future__ import annotations

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy

from sgdgen.passes.attrs import ALIASING_OUTPUT
from sgdgen.passes.common import arg_attrs, body_block, find_main, int_attr, top_ops


def defining_op(v: ir.Value, name: str | None = None) -> ir.Operation | None:
    """The op that defines `v` (None for a block argument), when it is called `name` if given."""
    owner = v.owner
    if isinstance(owner, ir.Block):
        return None
    owner = owner.operation if hasattr(owner, "operation") else owner
    return owner if name is None or owner.name == name else None


def concat_pieces(v: ir.Value) -> list[ir.Value] | None:
    """The pieces of a 1-D float32 `v` that is a `stablehlo.concatenate` of two or more 1-D
    float32 values (a flat bucket's gradient from its members' gradients), else None: a kernel
    may read the pieces where they lie instead of the concatenate XLA would materialise."""
    op = defining_op(v, "stablehlo.concatenate")
    f32 = ir.F32Type.get()
    if op is None or len(op.operands) < 2:
        return None
    for x in (v, *op.operands):
        t = ir.RankedTensorType(x.type)
        if t.rank != 1 or t.element_type != f32 or not t.has_static_shape:
            return None
    return list(op.operands)


def splat_float(v: ir.Value, element: ir.Type) -> float | None:
    """The value of `v` when it is a splat constant of element type `element` (any shape), else None."""
    const = defining_op(v, "stablehlo.constant")
    if const is None or ir.RankedTensorType(v.type).element_type != element:
        return None
    attr = ir.DenseElementsAttr(const.attributes["value"])
    return ir.DenseFPElementsAttr(attr).get_splat_value().value if attr.is_splat else None


def mesh_axes(module: ir.Operation) -> set[str]:
    return {sdy.MeshAxisAttr(a).name for op in top_ops(module) if op.name == "sdy.mesh"
            for a in sdy.MeshAttr(op.attributes["mesh"]).axes}


def _manual_over(op: ir.Operation, axes: set[str]) -> bool:
    return op.name == "sdy.manual_computation" and axes <= set(sdy.ManualAxesAttr(op.attributes["manual_axes"]))


def local_blocks(module: ir.Operation) -> list[ir.Block]:
    """The outermost blocks whose values are this device's (see the module docstring)."""
    main = find_main(module)
    if (int_attr(module, "mhlo.num_partitions") or 1) == 1:
        return [body_block(main)]
    axes = mesh_axes(module)
    found: list[ir.Block] = []

    def walk(op: ir.Operation) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    if _manual_over(child, axes):
                        found.extend(child.regions[0].blocks)
                    else:
                        walk(child)

    walk(main)
    return found


def _main_arg_index(v: ir.Value, main: ir.Operation) -> int | None:
    """`v`'s position among @main's arguments, through a manual computation's body arguments."""
    if not isinstance(v.owner, ir.Block):
        return None
    arg = ir.BlockArgument(v)
    parent = v.owner.owner
    parent = parent.operation if hasattr(parent, "operation") else parent
    if parent == main:
        return arg.arg_number
    if parent.name == "sdy.manual_computation":
        return _main_arg_index(parent.operands[arg.arg_number], main)
    return None


def _main_result_indices(value: ir.Value, main: ir.Operation) -> set[int]:
    """The positions at which @main returns `value`, through a manual computation's sdy.return."""
    out: set[int] = set()
    for use in value.uses:
        user = use.owner.operation if hasattr(use.owner, "operation") else use.owner
        if user.name == "func.return" and user.parent == main:
            out.add(use.operand_number)
        elif user.name == "sdy.return":
            manual = user.parent
            out |= _main_result_indices(manual.results[use.operand_number], main)
    return out


def donated_to(arg: ir.Value, result: ir.Value, module: ir.Operation) -> bool:
    """Whether local value `arg` is an @main argument that XLA aliases with an @main result that
    returns local value `result` (`tf.aliasing_output`): then `result` may be written over `arg`."""
    main = find_main(module)
    index = _main_arg_index(arg, main)
    attrs = arg_attrs(main, index) if index is not None else None
    if attrs is None or ALIASING_OUTPUT not in attrs:
        return False
    return ir.IntegerAttr(attrs[ALIASING_OUTPUT]).value in _main_result_indices(result, main)
