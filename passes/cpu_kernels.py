"""`sgd-cpu-kernels{min-elements=65536}`: float32 norms' float64 sums become FFI calls.

Runs on the final (stage-1) module, and only when it is compiled for XLA CPU with sgdgen's
kernel library loaded (`sgdgen.runtime.cpu_kernels`); the portable `step.mlirbc` and every
other platform keep the plain StableHLO. It rewrites the norm share of SEMANTICS §6 for a
float32 gradient:

    %sq = stablehlo.multiply %g, %g : tensor<...xf32>
    %w = stablehlo.convert %sq : (tensor<...xf32>) -> tensor<...xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [all]
         : (tensor<...xf64>, tensor<f64>) -> tensor<f64>            (%zero: dense<0.0>)

into

    %s = stablehlo.custom_call @sgdgen_sum_squares_f32(%g) {...} : (tensor<...xf32>) -> tensor<f64>

The sums of one block's arguments (the gradients of @main or of the manual computation's body)
share ONE call, placed at the block's start: `(g_1, ..., g_N) -> N x tensor<f64>`, as a call
costs more than a small gradient's sum (400 small gradients: XLA's 400 float64 reduces take
2.3 ms, their float32 ones 0.8 ms). A sum of a computed value (a ZeRO slice, an all_reduce's
result) gets a call of its own, before it. A call is made only for at least `min-elements`
elements in all (its sums together). A sum of a `stablehlo.concatenate` of 1-D pieces (a flat
bucket's gradient built from its members' gradients) becomes a call over the pieces with ONE
result, their sum together: the concatenate is never needed for it.

which computes the same sum (float32 products, accumulated in float64; only the order of the
float64 additions differs, which §6 leaves free). XLA CPU's float64 reduction is about three
times slower than its float32 one (docs/numerics.md §3a); the kernel reads the gradient once at
memory bandwidth.
Anything else (other dtypes, partial reductions, products of two different values, a
non-zero init) is left as it is.

A call must see this device's values only (`sgdgen.passes.locality`): a sum is rewritten only
in a module of one partition, or inside an `sdy.manual_computation` that is manual over every
axis of the mesh. A stage-0 module on several devices is left alone.
"""

from __future__ import annotations

import math
from typing import Any

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

from sgdgen.passes import register
from sgdgen.passes.common import count_option, guarded, module_of
from sgdgen.passes.locality import concat_pieces, defining_op, local_blocks, splat_float

NAME = "sgd-cpu-kernels"
#: the FFI target (csrc/sum_squares.cc), registered by sgdgen.runtime.cpu_kernels
SUM_SQUARES_F32 = "sgdgen_sum_squares_f32"
#: a call summing fewer elements than this (all its operands) is not made: XLA's reduce is cheaper
DEFAULT_MIN_ELEMENTS = 1 << 16


def _is_zero_f64(v: ir.Value) -> bool:
    """`v` is a float64 splat of +0.0 (the sum's init)."""
    value = splat_float(v, ir.F64Type.get())
    return value == 0.0 and math.copysign(1.0, value) > 0


def _is_add_body(reduce: ir.Operation) -> bool:
    ops = [o.operation for o in reduce.regions[0].blocks[0].operations]
    return (len(ops) == 2 and ops[0].name == "stablehlo.add" and ops[1].name == "stablehlo.return"
            and list(ops[1].operands) == [ops[0].result]
            and set(ops[0].operands) == set(reduce.regions[0].blocks[0].arguments))


def _match(reduce: ir.Operation) -> tuple[ir.Value, ir.Operation, ir.Operation] | None:
    """(g, its square, the square's convert) of a full float64 sum of `convert(g * g)` with g
    float32, else None."""
    if len(reduce.operands) != 2 or len(reduce.results) != 1:
        return None
    wide, init = reduce.operands
    result_type = ir.RankedTensorType(reduce.results[0].type)
    if result_type.rank != 0 or result_type.element_type != ir.F64Type.get() or not _is_zero_f64(init):
        return None
    wide_type = ir.RankedTensorType(wide.type)
    if sorted(ir.DenseI64ArrayAttr(reduce.attributes["dimensions"])) != list(range(wide_type.rank)):
        return None
    if not _is_add_body(reduce):
        return None
    convert = defining_op(wide, "stablehlo.convert")
    if convert is None:
        return None
    square = defining_op(convert.operands[0], "stablehlo.multiply")
    if square is None or square.operands[0] != square.operands[1]:
        return None
    g = square.operands[0]
    g_type = ir.RankedTensorType(g.type)
    if g_type.element_type != ir.F32Type.get() or not g_type.has_static_shape:
        return None
    return g, square, convert


def _reduces(op: ir.Operation, found: list[ir.Operation]) -> None:
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                child = child.operation
                if child.name == "stablehlo.reduce":
                    found.append(child)
                _reduces(child, found)


def _erase_if_unused(op: ir.Operation | None) -> None:
    if op is not None and all(not list(r.uses) for r in op.results):
        op.erase()


def _rewrite(op: Any, **options: str) -> None:
    """Replaces each large float32 norm sum by a call of the sum-of-squares kernel."""
    module = module_of(op)
    threshold = count_option(options, "min-elements", DEFAULT_MIN_ELEMENTS, module)
    reduces: list[ir.Operation] = []
    for block in local_blocks(module):
        for child in block.operations:
            if child.operation.name == "stablehlo.reduce":
                reduces.append(child.operation)
            _reduces(child.operation, reduces)
    # sums of the same block's arguments share one call (placed at the block's start); a sum of a
    # computed value gets a call of its own, before it
    groups: list[tuple[ir.Block | None, list[tuple[ir.Operation, tuple[ir.Value, ir.Operation, ir.Operation]]]]] = []
    together: dict[int, list[ir.Value]] = {}  # group index -> the pieces of a concatenate it sums as one
    for reduce in reduces:
        found = _match(reduce)
        if found is None:
            continue
        pieces = concat_pieces(found[0])
        if pieces is not None:
            together[len(groups)] = pieces
            groups.append((None, [(reduce, found)]))
            continue
        owner = found[0].owner
        block = owner if isinstance(owner, ir.Block) else None
        same = next((m for b, m in groups if block is not None and b is not None and b == block), None)
        if same is not None:
            same.append((reduce, found))
        else:
            groups.append((block, [(reduce, found)]))
    f64 = ir.RankedTensorType.get([], ir.F64Type.get())
    for k, (key, members) in enumerate(groups):
        gs = together.get(k) or [g for _, (g, _, _) in members]
        if sum(math.prod(ir.RankedTensorType(g.type).shape) for g in gs) < threshold:
            continue
        first = members[0][0]
        where = ir.InsertionPoint.at_block_begin(key) if key is not None else ir.InsertionPoint(first)
        with where, first.location:
            call = stablehlo.CustomCallOp([f64] * len(members), gs, SUM_SQUARES_F32,
                                          backend_config=ir.StringAttr.get(""))
            call.attributes["mhlo.backend_config"] = ir.DictAttr.get({})  # typed FFI, as jax.ffi.ffi_call
        for (reduce, (_, square, convert)), result in zip(members, call.results):
            reduce.results[0].replace_all_uses_with(result)
            reduce.erase()
            _erase_if_unused(convert)
            _erase_if_unused(square)
        if k in together:  # the update kernel may read the pieces too (sgd-cpu-update); else XLA's
            _erase_if_unused(defining_op(members[0][1][0]))


run = register(NAME, "float32 norm sums -> one XLA FFI kernel call (CPU executables only)",
               options=("min-elements",))(guarded(NAME, _rewrite))
