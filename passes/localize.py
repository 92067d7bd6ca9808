"""Type localization for `sgd-insert-collectives`: @main's body on per-device shapes.

Moves the body of @main into one `sdy.manual_computation` over every mesh axis, whose
in/out shardings are @main's own, and gives every sharded value its local type (a
dimension sharded over axes of total size k is divided by k); sharded splat constants are
rebuilt at their local shape. @main's signature keeps the global types.
"""

from __future__ import annotations

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func, sdy, stablehlo

from sgdgen.passes.common import PassError, body_block
from sgdgen.passes.layouts import Analysis, local_shape


def _local_type(t: ir.Type, layout: tuple, a: Analysis, what: str, where: ir.Operation) -> ir.Type:
    return ir.RankedTensorType.get(local_shape(t, layout, a.mesh, what, where), ir.RankedTensorType(t).element_type)


def wrap_in_manual_computation(a: Analysis) -> ir.Block:
    """Moves @main's body into an sdy.manual_computation over every mesh axis; returns its block."""
    main, ops = a.main, a.ops
    block = body_block(main)
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
    with ir.InsertionPoint.at_block_begin(block), main.location:
        mc = sdy.ManualComputationOp(
            list(ftype.results), list(block.arguments),
            sdy.TensorShardingPerValueAttr.get(a.in_shardings), sdy.TensorShardingPerValueAttr.get(a.out_shardings),
            sdy.ManualAxesAttr.get([ir.StringAttr.get(name) for name, _ in a.mesh.axes]))
        local_in = [_local_type(t, a.in_layouts[k], a, f"argument {k}", main) for k, t in enumerate(ftype.inputs)]
        inner = mc.regions[0].blocks.append(*local_in)
    for k, arg in enumerate(block.arguments):
        arg.replace_all_uses_except(inner.arguments[k], mc.operation)
    ret = ops[-1]
    for o in ops[:-1]:
        inner.append(o)
    with ir.InsertionPoint(inner), ret.location:
        sdy.ReturnOp(list(ret.operands))
    with ir.InsertionPoint(ret), ret.location:
        func.ReturnOp(list(mc.results))
    ret.erase()
    return inner


def localize_values(a: Analysis) -> None:
    """Gives every sharded value of the body its local type; rebuilds sharded splat constants."""
    body = a.ops[:-1]
    stale = []
    for o in body:
        for r in o.results:
            layout = a.value_layout(r)
            if not any(layout):
                continue
            local = _local_type(r.type, layout, a, f"value of {o.name}", o)
            if o.name == "stablehlo.constant":
                dense = ir.DenseElementsAttr(o.attributes["value"])
                if not dense.is_splat:
                    raise PassError("cannot shard a non-splat constant", o)
                with ir.InsertionPoint(o), o.location:
                    new = stablehlo.constant(ir.DenseElementsAttr.get_splat(local, dense.get_splat_value()))
                r.replace_all_uses_with(new)
                stale.append(o)
            else:
                r.set_type(local)
    for o in stale:
        o.erase()
