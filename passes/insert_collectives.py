"""`sgd-insert-collectives`: global view -> one per-device program with exact norms.

Wraps the fused body of @main in `sdy.manual_computation` over every mesh axis, so
the body runs once per device on local shards (every tensor takes the local shape of
its layout), and makes the step's norms exact with ONE `stablehlo.all_reduce`:

- each norm partial (`sgdgen.norm_partial`) is a sum over the device's shard; where
  the variable is replicated over some mesh axes, only the device at coordinate 0 of
  those axes keeps its partial, the others contribute 0 (coordinates come from
  `stablehlo.partition_id`), so duplicates are counted once — never divided by a
  replica count;
- the one value that joins all partials (`sgdgen.norms`, from sgd-fuse-step: a scalar
  for global_clipnorm, a vector for clipnorm) is summed over all devices by a single
  all_reduce.

Layouts reach every value by propagation: elementwise ops unify their operands and
results, `broadcast_in_dim` of a scalar and constants take the layout of their users,
reductions to a scalar end it. Two shardings meeting in one elementwise op, an op the
pass cannot partition, a result laid out differently from the value returned, or an
input that was not fused first are errors at the op.

Input (fused, global view):

    func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}, ...)
      %2 = stablehlo.reduce(%1 init: %cst) ... {sgdgen.norm_partial, sgdgen.norms} : (tensor<8x16xf64>, ...)

Output:

    %0:N = sdy.manual_computation(%arg0, ...) in_shardings=[...] out_shardings=[...]
        manual_axes={"batch", "model"} (%arg14: tensor<8x4xf32>, ...) {
      %2 = stablehlo.reduce(%1 init: %cst) ... : (tensor<8x4xf64>, tensor<f64>) -> tensor<f64>
      %5 = stablehlo.select %is_first_batch, %2, %zero            // replicated over "batch"
      %6 = "stablehlo.all_reduce"(%5) <{replica_groups = dense<[[0, 1, ..., 7]]> ...}>
      ...
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func, sdy, stablehlo

from sgdgen.passes import register
from sgdgen.passes.common import (PassError, arg_attrs, body_block, body_ops, find_main, guarded, module_of,
                                  symbol_name, top_ops)

NAME = "sgd-insert-collectives"

ELEMENTWISE = {
    f"stablehlo.{n}" for n in (
        "add subtract multiply divide remainder negate abs sqrt rsqrt maximum minimum power floor ceil "
        "exponential log cosine sine tanh convert compare select clamp and or not xor sign round_nearest_even"
    ).split()
}
SCALAR_ONLY = {"stablehlo.reshape", "stablehlo.concatenate", "stablehlo.slice", "stablehlo.partition_id",
               "stablehlo.all_reduce"}

Layout = tuple[tuple[str, ...], ...]


class _Classes:
    """Union-find over SSA values: values in one class share one layout."""

    def __init__(self) -> None:
        self.parent: dict[ir.Value, ir.Value] = {}

    def find(self, v: ir.Value) -> ir.Value:
        self.parent.setdefault(v, v)
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: ir.Value, b: ir.Value) -> None:
        self.parent[self.find(a)] = self.find(b)


def _is_ranked(t: ir.Type) -> bool:
    try:
        ir.RankedTensorType(t)
        return True
    except ValueError:
        return False


def _rank(v: ir.Value) -> int:
    return ir.RankedTensorType(v.type).rank if isinstance(v.type, ir.RankedTensorType) or _is_ranked(v.type) else 0


def _mesh_axes(module: ir.Operation) -> list[tuple[str, int]]:
    meshes = [op for op in top_ops(module) if op.name == "sdy.mesh"]
    if not meshes:
        raise PassError("the module has no sdy.mesh; declare the device mesh (sdy.mesh @mesh = <[...]>)", module)
    if len(meshes) > 1 or symbol_name(meshes[0]) != "mesh":
        raise PassError("expects exactly one mesh, named @mesh", meshes[-1])
    attr = sdy.MeshAttr(meshes[0].attributes["mesh"])
    axes = [(sdy.MeshAxisAttr(a).name, sdy.MeshAxisAttr(a).size) for a in attr.axes]
    if attr.device_ids and list(attr.device_ids) != list(range(math.prod(s for _, s in axes))):
        raise PassError("meshes with explicit device_ids are laid out by the runtime's device assignment; "
                        "declare the mesh without device_ids", meshes[0])
    return axes


def _layout(attr: ir.Attribute, what: str, where: ir.Operation, mesh: dict[str, int]) -> Layout:
    sharding = sdy.TensorShardingAttr(attr)
    if list(sharding.unreduced_axes):
        raise PassError(f"{what} has unreduced axes; the step takes reduced (ordinary) tensors", where)
    dims = []
    for d in sharding.dimension_shardings:
        axes = []
        for a in sdy.DimensionShardingAttr(d).axes:
            ref = sdy.AxisRefAttr(a)
            if ref.sub_axis_info is not None:
                raise PassError(f"{what} uses a sub-axis of {ref.name!r}; shard on whole mesh axes", where)
            if ref.name not in mesh:
                raise PassError(f"{what} is sharded on axis {ref.name!r}, which @mesh does not have "
                                f"(axes: {sorted(mesh)})", where)
            axes.append(ref.name)
        dims.append(tuple(axes))
    used = [a for d in dims for a in d]
    if len(set(used)) != len(used):
        raise PassError(f"{what} uses a mesh axis twice", where)
    return tuple(dims)


def _local_type(t: ir.Type, layout: Layout, mesh: dict[str, int], what: str, where: ir.Operation) -> ir.Type:
    rt = ir.RankedTensorType(t)
    shape = list(rt.shape)
    if len(layout) != len(shape):
        raise PassError(f"{what}: sharding has {len(layout)} dimensions but the type {t} has {len(shape)}", where)
    local = []
    for i, (n, axes) in enumerate(zip(shape, layout)):
        k = math.prod(mesh[a] for a in axes)
        if n % k:
            raise PassError(f"{what}: dimension {i} of size {n} is not divisible by {k} (axes {list(axes)})", where)
        local.append(n // k)
    return ir.RankedTensorType.get(local, rt.element_type)


def _propagate(main: ir.Operation, ops: list[ir.Operation]) -> _Classes:
    classes = _Classes()
    for op in ops:
        name = op.name
        if name == "func.call":
            raise PassError("@main still calls stage functions; run sgd-fuse-step first", op)
        if name in ELEMENTWISE:
            tensors = [v for v in [*op.operands, *op.results] if _rank(v) > 0]
            for v in tensors[1:]:
                classes.union(tensors[0], v)
        elif name == "stablehlo.optimization_barrier":
            for a, r in zip(op.operands, op.results):
                if _rank(a) > 0:
                    classes.union(a, r)
        elif name == "stablehlo.broadcast_in_dim":
            if _rank(op.operands[0]) != 0:
                raise PassError("can only partition broadcasts of scalars", op)
        elif name == "stablehlo.reduce":
            if any(_rank(r) != 0 for r in op.results):
                raise PassError("can only partition reductions to a scalar (a norm partial)", op)
        elif name in ("stablehlo.constant", "func.return") or name in SCALAR_ONLY:
            pass
        else:
            raise PassError(f"cannot partition {name}: the step is elementwise apart from its norm reductions", op)
    return classes


def _source_tensor(partial: ir.Operation) -> ir.Value | None:
    """The tensor a norm partial sums over: up its def chain through scalar ops (past
    constants) to the first non-scalar value; a scalar argument is its own source."""

    def search(v: ir.Value) -> ir.Value | None:
        if _rank(v) > 0 or isinstance(v.owner, ir.Block):
            return v
        if v.owner.name == "stablehlo.constant":
            return None
        for operand in v.owner.operands:
            found = search(operand)
            if found is not None:
                return found
        return None

    return search(partial.results[0])


def _reductions_feeding_partials(ops: list[ir.Operation]) -> set[ir.Operation]:
    """Reduce ops that a norm partial is computed from (through scalar ops): their sums are
    completed across devices by the all_reduce; any other reduce of a sharded value is not."""
    found: set[ir.Operation] = set()

    def walk(v: ir.Value) -> None:
        if isinstance(v.owner, ir.Block) or _rank(v) > 0:
            return
        op = v.owner.operation
        if op.name == "stablehlo.reduce":
            found.add(op)
            return
        for operand in op.operands:
            walk(operand)

    for o in ops:
        if "sgdgen.norm_partial" in o.attributes:
            if o.name == "stablehlo.reduce":
                found.add(o)
            for operand in o.operands:
                walk(operand)
    return found


def _coordinate_mask(pid: ir.Value, axes: list[tuple[str, int]], replicated: list[str]) -> ir.Value:
    """i1 scalar: this device is at coordinate 0 of every axis in `replicated`."""
    u32 = ir.RankedTensorType.get([], ir.IntegerType.get_unsigned(32))

    def const(x: int) -> ir.Value:
        return stablehlo.constant(ir.DenseElementsAttr.get_splat(u32, ir.IntegerAttr.get(
            ir.IntegerType.get_unsigned(32), x)))

    sizes = [s for _, s in axes]
    pred = None
    for a in replicated:
        i = [n for n, _ in axes].index(a)
        stride = math.prod(sizes[i + 1:])
        coord = stablehlo.remainder(stablehlo.divide(pid, const(stride)), const(sizes[i]))
        is_zero = stablehlo.compare(coord, const(0), comparison_direction=stablehlo.ComparisonDirectionAttr.get("EQ"))
        pred = is_zero if pred is None else stablehlo.and_(pred, is_zero)
    return pred


def _all_reduce_sum(v: ir.Value, n_devices: int) -> ir.Value:
    """One all_reduce (sum) over every device of the mesh."""
    t = ir.RankedTensorType(v.type)
    groups = ir.DenseElementsAttr.get(np.arange(n_devices, dtype=np.int64).reshape(1, n_devices))
    op = stablehlo.AllReduceOp([t], [v], groups,
                               channel_handle=ir.Attribute.parse("#stablehlo.channel_handle<handle = 1, type = 1>"),
                               use_global_device_ids=True)
    scalar = ir.RankedTensorType.get([], t.element_type)
    block = op.regions[0].blocks.append(scalar, scalar)
    with ir.InsertionPoint(block):
        stablehlo.return_([stablehlo.add(block.arguments[0], block.arguments[1])])
    return op.results[0]


def _partition(op: Any) -> None:
    """Wrap @main's body in sdy.manual_computation on local shapes; one all_reduce for all norms."""
    module = module_of(op)
    axes = _mesh_axes(module)
    mesh = dict(axes)
    main = find_main(module)
    ops = body_ops(main)
    if any(o.name == "sdy.manual_computation" for o in ops):
        raise PassError("@main is already partitioned (it holds an sdy.manual_computation)", main)
    block = body_block(main)
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)

    def sharding(k: int, results: bool) -> ir.Attribute:
        d = arg_attrs(main, k, results)
        what = f"{'result' if results else 'argument'} {k}"
        if d is None or "sdy.sharding" not in d:
            raise PassError(f"{what} of @main has no sdy.sharding; give every argument and result a "
                            "#sdy.sharding (sgdgen emit does)", main)
        return d["sdy.sharding"]

    in_sh = [sharding(k, False) for k in range(len(ftype.inputs))]
    out_sh = [sharding(k, True) for k in range(len(ftype.results))]
    in_layouts = [_layout(a, f"argument {k}", main, mesh) for k, a in enumerate(in_sh)]
    out_layouts = [_layout(a, f"result {k}", main, mesh) for k, a in enumerate(out_sh)]

    classes = _propagate(main, ops)
    layout_of: dict[ir.Value, tuple[Layout, int]] = {}
    for k, arg in enumerate(block.arguments):
        if _rank(arg) == 0:
            continue
        root = classes.find(arg)
        if root in layout_of and layout_of[root][0] != in_layouts[k]:
            other = layout_of[root][1]
            raise PassError(f"arguments {other} and {k} are combined elementwise but sharded differently "
                            f"({list(layout_of[root][0])} vs {list(in_layouts[k])}); the step does not reshard",
                            main)
        layout_of[root] = (in_layouts[k], k)

    def value_layout(v: ir.Value) -> Layout:
        if _rank(v) == 0:
            return ()
        found = layout_of.get(classes.find(v))
        return found[0] if found else tuple(() for _ in range(_rank(v)))

    covered = _reductions_feeding_partials(ops[:-1])
    for o in ops[:-1]:
        sharded = [v for v in [*o.operands, *o.results] if any(value_layout(v))]
        if not sharded:
            continue
        if o.name in SCALAR_ONLY:
            raise PassError(f"cannot partition {o.name} of a sharded value: only elementwise ops and norm "
                            "reductions touch sharded tensors", o)
        if o.name == "stablehlo.reduce" and o not in covered:
            raise PassError("a reduction over a sharded value must be a norm partial (sgdgen.norm_partial) so "
                            "that its all_reduce is inserted; run sgd-fuse-step on a module sgdgen emit produced", o)

    ret = ops[-1]
    for k, v in enumerate(ret.operands):
        if value_layout(v) != out_layouts[k]:
            raise PassError(f"result {k} is declared {list(out_layouts[k])} but the value returned is laid out "
                            f"{list(value_layout(v))}; the step does not reshard", ret)
    for k, t in enumerate(ftype.inputs):
        _local_type(t, in_layouts[k], mesh, f"argument {k}", main)

    # Build the manual computation and move the body into it.
    with ir.InsertionPoint.at_block_begin(block), main.location:
        mc = sdy.ManualComputationOp(
            list(ftype.results), list(block.arguments),
            sdy.TensorShardingPerValueAttr.get(in_sh), sdy.TensorShardingPerValueAttr.get(out_sh),
            sdy.ManualAxesAttr.get([ir.StringAttr.get(a) for a, _ in axes]))
        local_in = [_local_type(t, in_layouts[k], mesh, f"argument {k}", main) for k, t in enumerate(ftype.inputs)]
        inner = mc.regions[0].blocks.append(*local_in)
    for k, arg in enumerate(block.arguments):
        arg.replace_all_uses_except(inner.arguments[k], mc.operation)
    for o in ops[:-1]:
        inner.append(o)
    with ir.InsertionPoint(inner), ret.location:
        sdy.ReturnOp(list(ret.operands))
    with ir.InsertionPoint(ret), ret.location:
        func.ReturnOp(list(mc.results))
    ret.erase()

    partials = [o for o in ops[:-1] if "sgdgen.norm_partial" in o.attributes]
    norms = [o for o in ops[:-1] if "sgdgen.norms" in o.attributes]
    # Give every sharded value its local type.
    for o in ops[:-1]:
        for r in o.results:
            lay = value_layout(r)
            if not any(lay):
                continue
            local = _local_type(r.type, lay, mesh, f"value of {o.name}", o)
            if o.name == "stablehlo.constant":
                dense = ir.DenseElementsAttr(o.attributes["value"])
                if not dense.is_splat:
                    raise PassError("cannot shard a non-splat constant", o)
                with ir.InsertionPoint(o), o.location:
                    new = stablehlo.constant(ir.DenseElementsAttr.get_splat(local, dense.get_splat_value()))
                r.replace_all_uses_with(new)
            else:
                r.set_type(local)
    for o in ops[:-1]:
        if o.name == "stablehlo.constant" and any(value_layout(o.results[0])):
            o.erase()

    # Exact norms: mask duplicated partials, then one all_reduce for all of them.
    if partials and len(norms) != 1:
        raise PassError("norm partials are not joined into one sgdgen.norms value; run sgd-fuse-step first",
                        partials[0])
    if not partials or math.prod(mesh.values()) == 1:
        return
    with ir.InsertionPoint.at_block_begin(inner), main.location:
        pid = stablehlo.partition_id()
    masked_of: dict[ir.Operation, ir.Value] = {}
    for p in partials:
        source = _source_tensor(p)
        used = {a for d in (value_layout(source) if source is not None else ()) for a in d}
        replicated = [a for a, s in axes if a not in used and s > 1]
        if not replicated:
            continue
        v = p.results[0]
        with ir.InsertionPoint.after(p), p.location:
            keep = _coordinate_mask(pid, axes, replicated)
            zero = stablehlo.constant(ir.DenseElementsAttr.get_splat(
                v.type, ir.FloatAttr.get(ir.RankedTensorType(v.type).element_type, 0.0)))
            masked = stablehlo.select(keep, v, zero)
        v.replace_all_uses_except(masked, masked.owner.operation)
        masked_of[p] = masked
    # The value to sum over devices: the join of all partials (masked, when it is itself one).
    total = masked_of.get(norms[0], norms[0].results[0])
    with ir.InsertionPoint.after(total.owner), total.owner.location:
        reduced = _all_reduce_sum(total, math.prod(mesh.values()))
    total.replace_all_uses_except(reduced, reduced.owner.operation)


run = register(NAME, "Partition @main into a per-device sdy.manual_computation; reduce all norms with one "
                     "all_reduce.")(guarded(NAME, _partition))
