"""`sgd-shard-weight-update{axis=batch}`: weight-update sharding (ZeRO-1/2) over one mesh axis.

Runs on the per-device program that `sgd-insert-collectives` produced. For every variable
replicated over `axis` (size N > 1), by the one rule of `sgdgen.frontend.zero`:

- its optimizer slots (momentum, EMA average) become 1/N shards over `axis` (on the first
  dimension whose per-device size divides by N, else dimension 0 padded with zeros): @main's
  argument and result types and shardings, and the manual computation's, change with them;
- the variable and its reduced (replicated) gradient are zero-padded where needed and cut to
  this device's 1/N by a `stablehlo.dynamic_slice` at an offset derived from `partition_id`;
- a gradient that arrived unreduced over `axis` (an operand of the all_reduce that
  `sgd-insert-collectives` tagged `sgdgen.unreduced_axes`) is taken out of that all_reduce and
  summed by ONE `stablehlo.reduce_scatter` over `axis` on the plan's dimension instead (padded
  first where needed; any other unreduced axes still summed, by an all_reduce of the 1/N slice):
  the sum and the cut in one collective, with the volume of the all_reduce it replaces;
- the update chain runs on the 1/N slice (every value of the variable's elementwise class
  takes the slot's local type; splat constants are rebuilt);
- the new variable is put back together with one `stablehlo.all_gather` over `axis` (and
  unpadded by a static slice);
- its norm partial now sums a 1/N slice, so the device mask of `sgd-insert-collectives` no
  longer drops the other coordinates of `axis`: the partials join the one existing all_reduce
  and the norm stays exact (no second collective).

Which arguments are a variable's: the elementwise class of a variable holds its state
arguments and its gradient; by the calling convention (`sgdgen.codegen.abi`: variables before
their slots, state before gradients) the first state argument is the variable, the other state
arguments its slots, the arguments after `sgdgen.state_count` its gradients. Variables already
sharded over `axis` and scalars are left alone; if no variable is replicated over `axis`, or
the axis is not a mesh axis, the pass fails with a diagnostic (a pipeline asking to shard over
an axis that shards nothing is a mistake).
"""

from __future__ import annotations

import math
import re
from typing import Any

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy, stablehlo

from sgdgen.frontend.zero import ShardPlan, shard_plan
from sgdgen.passes import register
from sgdgen.passes.attrs import NORM_PARTIAL, SHARDING, STATE_COUNT, UNREDUCED_AXES
from sgdgen.passes.collectives import Collectives
from sgdgen.passes.common import PassError, arg_attrs, body_block, body_ops, find_main, guarded, int_attr, module_of
from sgdgen.passes.insert_collectives import _source_tensor
from sgdgen.passes.layouts import Layout, _layout, _propagate, mesh_info, rank

NAME = "sgd-shard-weight-update"


def _sharding_text(mesh: str, dims: Layout) -> ir.Attribute:
    body = ", ".join("{" + ", ".join(f'"{a}"' for a in d) + "}" for d in dims)
    return ir.Attribute.parse(f"#sdy.sharding<@{mesh}, [{body}]>")


def _with_sharding(d: ir.DictAttr | None, sharding: ir.Attribute) -> ir.DictAttr:
    entries = {n.name: n.attr for n in d} if d is not None else {}
    entries[SHARDING] = sharding
    return ir.DictAttr.get(entries)


def _next_channel(ops: list[ir.Operation]) -> int:
    """One past the highest channel handle already in the program (handles must be unique). The
    body is straight-line, so its collectives are among `ops`; only their handle attributes are
    printed, never the module (linear in the ops, not in the text)."""
    found = [int(m) for o in ops if "channel_handle" in o.attributes
             for m in re.findall(r"handle = (\d+)", str(o.attributes["channel_handle"]))]
    return max(found, default=0) + 1


def _i32(x: int) -> ir.Value:
    i32 = ir.IntegerType.get_signless(32)
    return stablehlo.constant(ir.DenseElementsAttr.get_splat(ir.RankedTensorType.get([], i32),
                                                             ir.IntegerAttr.get(i32, x)))


def _typed(t: ir.Type, shape: tuple[int, ...]) -> ir.Type:
    return ir.RankedTensorType.get(list(shape), ir.RankedTensorType(t).element_type)


class _Group:
    """One variable's arguments: the variable, its slots and gradients (argument indices)."""

    def __init__(self, var: int, slots: list[int], grads: list[int], plan: ShardPlan):
        self.var, self.slots, self.grads, self.plan = var, slots, grads, plan


def _pad_local(x: ir.Value, plan: ShardPlan) -> ir.Value:
    """`x` (a per-device value of the variable's local shape) zero-padded to `plan.padded_local`."""
    if not plan.padded:
        return x
    t = ir.RankedTensorType(x.type)
    zero = stablehlo.constant(ir.DenseElementsAttr.get_splat(
        ir.RankedTensorType.get([], t.element_type), ir.FloatAttr.get(t.element_type, 0.0)))
    high = [p - s for p, s in zip(plan.padded_local, plan.local)]
    return stablehlo.pad(x, zero, [0] * t.rank, high, [0] * t.rank)


def _slice_local(x: ir.Value, plan: ShardPlan, offset: ir.Value) -> ir.Value:
    """This device's 1/N of `x` (a per-device value of the variable's local shape)."""
    x = _pad_local(x, plan)
    starts = [offset if i == plan.dim else _i32(0) for i in range(ir.RankedTensorType(x.type).rank)]
    return stablehlo.dynamic_slice(x, starts, list(plan.slot_local))


def _gradient_sums(inner: ir.Block) -> list[ir.Operation]:
    """The all_reduces of unreduced gradients that sgd-insert-collectives inserted."""
    return [o.operation for o in inner.operations if UNREDUCED_AXES in o.operation.attributes]


def _axes_of(op: ir.Operation) -> list[str]:
    return [ir.StringAttr(a).value for a in ir.ArrayAttr(op.attributes[UNREDUCED_AXES])]


def _scattered(inner: ir.Block, axis: str) -> dict[int, ir.Operation]:
    """Gradient argument index -> the all_reduce (of sgd-insert-collectives) summing it over `axis`."""
    found = {}
    for op in _gradient_sums(inner):
        v = op.operands[0]
        if axis in _axes_of(op) and isinstance(v.owner, ir.Block):
            found[ir.BlockArgument(v).arg_number] = op
    return found


def _reduce_scatter(op: ir.Operation, plan: ShardPlan, c: Collectives, axis: str) -> None:
    """Replaces the gradient all_reduce `op` by ONE reduce_scatter over `axis` of its (padded)
    operand on `plan.dim` (then an all_reduce of the 1/N slice over its other axes, if any)."""
    rest = [a for a in _axes_of(op) if a != axis]
    with ir.InsertionPoint(op), op.location:
        part = c.reduce_scatter_sum(_pad_local(op.operands[0], plan), plan.dim, axis)
        if rest:
            part = c.all_reduce_sum(part, rest)
            part.owner.operation.attributes[UNREDUCED_AXES] = ir.ArrayAttr.get([ir.StringAttr.get(a) for a in rest])
    op.results[0].replace_all_uses_with(part)
    op.erase()


def _shard(op: Any, axis: str | None) -> None:
    module = module_of(op)
    mesh = mesh_info(module)
    if not axis:
        raise PassError("give the data-parallel axis, e.g. sgd-shard-weight-update{axis=batch}", module)
    if axis not in mesh.sizes:
        raise PassError(f"axis {axis!r} is not an axis of @{mesh.name} (axes: {[a for a, _ in mesh.axes]}); "
                        "name the data-parallel mesh axis", module)
    main = find_main(module)
    if mesh.sizes[axis] == 1:
        return  # N = 1: every device already holds all of the state
    mcs = [o for o in body_ops(main) if o.name == "sdy.manual_computation"]
    if len(mcs) != 1:
        raise PassError("@main is not partitioned; run sgd-insert-collectives before this pass", main)
    mc = mcs[0]
    inner = mc.regions[0].blocks[0]
    ops = [o.operation for o in inner.operations]
    state_count = int_attr(main, STATE_COUNT)
    if state_count is None:
        raise PassError(f"@main has no {STATE_COUNT}; run it on a module sgdgen emit produced", main)
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
    in_types, out_types = list(ftype.inputs), list(ftype.results)  # once: each ftype.inputs builds all N
    in_sh = [arg_attrs(main, k)[SHARDING] for k in range(len(in_types))]
    out_sh = [arg_attrs(main, k, True)[SHARDING] for k in range(len(out_types))]
    layouts = [_layout(s, f"argument {k}", main, mesh, allow_unreduced=k >= state_count) for k, s in enumerate(in_sh)]

    classes = _propagate(ops[:-1])
    members: dict[ir.Value, list[int]] = {}
    for k, arg in enumerate(inner.arguments):
        if rank(arg) > 0:
            members.setdefault(classes.find(arg), []).append(k)
    groups: dict[ir.Value, _Group] = {}
    already = []
    for root, ks in members.items():
        state = [k for k in ks if k < state_count]
        if not state:
            continue
        var, slots, grads = state[0], state[1:], [k for k in ks if k >= state_count]
        if any(layouts[s] != layouts[var] for s in slots):
            raise PassError(f"the slots of argument {var} are not laid out like it; the weight update is already "
                            "sharded (run this pass once, on the output of sgd-insert-collectives)", main)
        shape = tuple(ir.RankedTensorType(in_types[var]).shape)
        plan = shard_plan(shape, layouts[var], mesh.sizes, axis)
        if plan is None:
            already.append(var)
            continue
        groups[root] = _Group(var, slots, grads, plan)
    if not groups:
        raise PassError(f"no variable is replicated over axis {axis!r} (arguments {already} are already sharded on "
                        "it, or scalars): there is no weight update to shard; drop the pass or name another axis",
                        main)

    c = Collectives(mesh.axes, first_channel=_next_channel(ops))
    sums_of = _scattered(inner, axis)  # gradients that arrive unreduced over `axis`: reduce-scattered
    scattered: dict[int, ShardPlan] = {k: g.plan for g in groups.values() for k in g.grads if k in sums_of}
    with ir.InsertionPoint.at_block_begin(inner), main.location:
        pid = stablehlo.partition_id()
        coord = stablehlo.convert(ir.RankedTensorType.get([], ir.IntegerType.get_signless(32)),
                                  c.coordinate(pid, axis))
    new_in, new_out = list(in_types), list(out_types)
    in_sh, out_sh = list(in_sh), list(out_sh)
    ret = ops[-1]
    # every group's values and norm partials, read before anything is erased
    values_of: dict[ir.Value, list[ir.Value]] = {root: [] for root in groups}
    for o in ops[:-1]:  # one walk over the body, each value filed under its class (linear in the ops)
        for r in o.results:
            if rank(r) > 0:
                values_of.get(classes.find(r), []).append(r)
    partials_of = {root: [] for root in groups}
    for p in [o for o in ops if NORM_PARTIAL in o.attributes]:
        source = _source_tensor(p)
        if source is not None and classes.find(source) in groups:
            partials_of[classes.find(source)].append(p)
    for root, g in groups.items():
        plan = g.plan
        slot_local = plan.slot_local
        # 1. the class's values (computed before anything moves) take the slice's shape
        values = values_of[root]
        with ir.InsertionPoint.after(coord.owner), main.location:
            offset = stablehlo.multiply(coord, _i32(slot_local[plan.dim]))
            for k in [g.var, *(k for k in g.grads if k not in scattered)]:
                arg = inner.arguments[k]
                part = _slice_local(arg, plan, offset)
                first = part.owner.operands[0].owner if plan.padded else part.owner  # the pad, else the slice
                arg.replace_all_uses_except(part, first.operation)
        for r in values:
            o = r.owner
            if o.name == "stablehlo.constant":
                dense = ir.DenseElementsAttr(o.attributes["value"])
                with ir.InsertionPoint(o), o.location:
                    new = stablehlo.constant(ir.DenseElementsAttr.get_splat(_typed(r.type, slot_local),
                                                                           dense.get_splat_value()))
                r.replace_all_uses_with(new)
                o.erase()
            else:
                r.set_type(_typed(r.type, slot_local))
        # 2. the slots: sharded arguments and results
        sharding = _sharding_text(mesh.name, plan.slot_dims)
        for k in g.slots:
            inner.arguments[k].set_type(_typed(inner.arguments[k].type, slot_local))
            new_in[k], new_out[k] = _typed(in_types[k], plan.slot_shape), _typed(out_types[k], plan.slot_shape)
            body_block(main).arguments[k].set_type(new_in[k])
            mc.results[k].set_type(new_out[k])
            in_sh[k] = out_sh[k] = sharding
        # 3. the new variable: all-gathered, unpadded
        with ir.InsertionPoint(ret), ret.location:
            full = c.all_gather(ret.operands[g.var], plan.dim, axis)
            if plan.padded:
                full = stablehlo.slice(full, [0] * len(plan.local), list(plan.local), [1] * len(plan.local))
        ret.operands[g.var] = full
        # 4. the norm partials of this variable now cover a 1/N slice: every coordinate of `axis` counts
        for p in partials_of[root]:
            _unmask(p, c, pid, [a for a, s in mesh.axes if s > 1 and a != axis and
                                 not any(a in d for d in layouts[g.var])])
    for k, plan in scattered.items():
        _reduce_scatter(sums_of[k], plan, c, axis)
    mc.attributes["in_shardings"] = sdy.TensorShardingPerValueAttr.get(in_sh)
    mc.attributes["out_shardings"] = sdy.TensorShardingPerValueAttr.get(out_sh)
    main.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(new_in, new_out))
    main.attributes["arg_attrs"] = ir.ArrayAttr.get([_with_sharding(arg_attrs(main, k), s) for k, s in enumerate(in_sh)])
    main.attributes["res_attrs"] = ir.ArrayAttr.get([_with_sharding(arg_attrs(main, k, True), s)
                                                     for k, s in enumerate(out_sh)])


def _unmask(partial: ir.Operation, c: Collectives, pid: ir.Value, replicated: list[str]) -> None:
    """Re-masks `partial`'s duplicate-dropping select to the axes it is still replicated over."""
    v = partial.results[0]
    for use in list(v.uses):
        sel = use.owner
        if sel.name != "stablehlo.select" or sel.operands[1] != v:
            continue
        if not replicated:
            sel.results[0].replace_all_uses_with(v)
            sel.erase()
        else:
            with ir.InsertionPoint(sel), sel.location:
                sel.operands[0] = c.is_first(pid, replicated)


def _run(op: Any, axis: str | None = None) -> None:
    """Shard the weight update of variables replicated over `axis` (see the module docstring)."""
    _shard(op, axis)


run = register(NAME, "Weight-update sharding (ZeRO-1/2): slots of variables replicated over {axis} divided over "
                     "it, the update on a partition_id-derived 1/N slice, the weights all-gathered; norms exact "
                     "in the one all_reduce.", options=("axis",))(guarded(NAME, _run))
