"""`sgd-fuse-step`: inline the stage functions into @main and join the step's norms.

After it, @main is one straight-line program: each variable's clip -> decay ->
update -> EMA -> overwrite is a single elementwise chain (XLA fuses it into one
loop with no intermediate in memory), and every norm partial of the step is joined
into one value tagged `sgdgen.norms`:

- global_clipnorm: the per-variable l2_loss partials are summed in a balanced tree
  (a scalar);
- clipnorm: the per-variable partials are packed into one vector, each clip reading
  its own element back;
- skip_nonfinite: the per-variable non-finite counts (`sgdgen.nonfinite` partials) are
  summed like the global norm, and the count joins the norm in one vector (alone it is
  the joined value);

so that `sgd-insert-collectives` reduces all norms of the step with one all_reduce.

Input (stage 0):

    func.func private @l2_loss_8x16xf32(%g) -> tensor<f64> attributes {sgdgen.stage = "norm_partial"}
    func.func public @main(...) {
      %partial0 = func.call @l2_loss_8x16xf32(%arg10)
      %partial1 = func.call @l2_loss_16xf32(%arg11)
      %total1 = stablehlo.add %partial0, %partial1 : tensor<f64>
      %scale = func.call @global_norm_scale_f32(%total1)
      ...

Output:

    func.func public @main(...) {
      %0 = stablehlo.multiply %arg10, %arg10 ...
      %3 = stablehlo.reduce(%2 init: %cst) ... {sgdgen.norm_partial}
      ...
      %9 = stablehlo.add %3, %8 {sgdgen.norms} : tensor<f64>
      ...
"""

from __future__ import annotations

from typing import Any

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

from sgdgen import backend
from sgdgen.passes import register
from sgdgen.passes.attrs import NONFINITE, NONFINITE_STAGE, NORM_PARTIAL as PARTIAL, NORM_PARTIAL_STAGE, NORMS, STAGE
from sgdgen.passes.common import PassError, body_ops, find_functions, find_main, guarded, module_of, string_attr

NAME = "sgd-fuse-step"


def _inline_calls(main: ir.Operation, functions: dict[str, ir.Operation]) -> set[str]:
    """Inlines every func.call in @main; tags the ops that produce norm partials.

    Each callee is checked once, however many calls it has (linear in the calls)."""
    inlined: set[str] = set()
    for op in body_ops(main):
        if op.name != "func.call":
            continue
        callee_name = ir.FlatSymbolRefAttr(op.attributes["callee"]).value
        callee = functions.get(callee_name)
        if callee is None:
            raise PassError(f"call to @{callee_name}, which is not defined in this module", op)
        if callee_name not in inlined:
            if not callee.regions[0].blocks or not len(callee.regions[0].blocks):
                raise PassError(f"call to @{callee_name}, which is only declared (no body to inline)", op)
            if any(o.name == "func.call" for o in body_ops(callee)):
                raise PassError(f"@{callee_name} calls another function; stage functions must be straight-line",
                                callee)
        with ir.InsertionPoint(op), op.location:
            new_values = backend.inlined_func_call(callee, op.operands)
        stage = string_attr(callee, STAGE)
        if stage in (NORM_PARTIAL_STAGE, NONFINITE_STAGE):
            for v in new_values:
                if isinstance(v.owner, ir.Block):
                    raise PassError(f"norm partial @{callee_name} returns its argument; it must compute a value", callee)
                v.owner.attributes[PARTIAL] = ir.UnitAttr.get()
                if stage == NONFINITE_STAGE:
                    v.owner.attributes[NONFINITE] = ir.UnitAttr.get()
        for old, new in zip(op.results, new_values):
            old.replace_all_uses_with(new)
        op.erase()
        inlined.add(callee_name)
    return inlined


def _is_partial(v: ir.Value, nonfinite: bool = False) -> bool:
    """`v` is a norm partial (`nonfinite`: a non-finite count; else a norm's share)."""
    return (not isinstance(v.owner, ir.Block) and PARTIAL in v.owner.attributes
            and (NONFINITE in v.owner.attributes) == nonfinite)


def _balanced_sum(values: list[ir.Value]) -> ir.Value:
    """Pairwise sum: depth log2(n) instead of a chain of n adds."""
    while len(values) > 1:
        nxt = [stablehlo.add(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]
        if len(values) % 2:
            nxt.append(values[-1])
        values = nxt
    return values[0]


def _sum_of(main: ir.Operation, nonfinite: bool) -> list[ir.Value]:
    """The values one kind of partial contributes to the joined norms: the chain of adds that
    sums them (global_clipnorm's norm, the non-finite counts) rebuilt as a balanced tree, one
    scalar; or, when no add sums them (clipnorm), the partials themselves."""
    ops = body_ops(main)
    partials = [op.result for op in ops if PARTIAL in op.attributes and _is_partial(op.result, nonfinite)]
    adds = _partial_sum_chain(ops, nonfinite)
    if not adds:
        return partials
    root = adds[-1]
    leaves = [v for a in adds for v in a.operands if _is_partial(v, nonfinite)]
    with ir.InsertionPoint(root), root.location:
        total = _balanced_sum(leaves)
    root.result.replace_all_uses_with(total)
    for a in reversed(adds):
        a.erase()
    return [total]


def _join_norms(main: ir.Operation) -> None:
    """Builds the one value that carries all norm partials of the step (and the non-finite count)."""
    elements = _sum_of(main, nonfinite=False) + _sum_of(main, nonfinite=True)
    if not elements:
        return
    if len(elements) == 1:
        elements[0].owner.attributes[NORMS] = ir.UnitAttr.get()
        return
    # Several scalars (clipnorm's partials, a norm and a count): pack them into one vector and
    # read each element back. Scalars of several widths (f32 for 16-bit, f64 for f32): the vector
    # takes the widest, and each converts to it and back (exact: a widening round trip).
    order = {op: k for k, op in enumerate(body_ops(main))}
    last = max((e.owner.operation for e in elements), key=order.__getitem__)
    wide = max((ir.RankedTensorType(p.type).element_type for p in elements), key=lambda t: ir.FloatType(t).width)
    with ir.InsertionPoint.after(last), last.location:
        vec1 = ir.RankedTensorType.get([1], wide)
        widened = [_convert(p, wide) for p in elements]
        pieces = [stablehlo.reshape(vec1, w) for w in widened]
        # the op that reads each element itself (its convert, or the reshape) keeps reading it
        readers = [(w if w != p else piece).owner.operation for p, w, piece in zip(elements, widened, pieces)]
        packed = stablehlo.concatenate(pieces, 0)
        packed.owner.attributes[NORMS] = ir.UnitAttr.get()
        for k, p in enumerate(elements):
            piece = stablehlo.slice(packed, [k], [k + 1], [1])
            elem = _convert(stablehlo.reshape(ir.RankedTensorType.get([], wide), piece),
                            ir.RankedTensorType(p.type).element_type)
            p.replace_all_uses_except(elem, readers[k])


def _convert(value: ir.Value, element_type: ir.Type) -> ir.Value:
    """`value` (a scalar) converted to `element_type`, or itself when it already has that type."""
    if ir.RankedTensorType(value.type).element_type == element_type:
        return value
    return stablehlo.convert(ir.RankedTensorType.get([], element_type), value)


def _partial_sum_chain(ops: list[ir.Operation], nonfinite: bool) -> list[ir.Operation]:
    """The adds (in program order) that only sum partials of one kind and each other (a set for
    membership: the chain has one add per variable)."""
    members: list[ir.Operation] = []
    seen: set[ir.Operation] = set()
    for op in ops:
        if op.name != "stablehlo.add":
            continue
        if all(_is_partial(v, nonfinite) or (not isinstance(v.owner, ir.Block) and v.owner.operation in seen)
               for v in op.operands):
            members.append(op)
            seen.add(op)
    return members


def _fuse(op: Any) -> None:
    """Inline every stage of @main, drop the inlined stage functions, join the norms."""
    module = module_of(op)
    functions = find_functions(module)
    main = find_main(module)
    if any(o.name == "sdy.manual_computation" for o in body_ops(main)):
        raise PassError("@main is already partitioned (sdy.manual_computation); run sgd-fuse-step before "
                        "sgd-insert-collectives", main)
    inlined = _inline_calls(main, functions)
    for name in inlined:
        functions[name].erase()
    _join_norms(main)


run = register(NAME, "Inline the stage functions into @main; join all norm partials of the step into one value.")(
    guarded(NAME, _fuse))
