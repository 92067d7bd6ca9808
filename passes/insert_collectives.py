"""`sgd-insert-collectives`: global view -> one per-device program with exact norms and gradients.

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
  all_reduce;
- gradient arguments that arrive unreduced over some axes (`unreduced={"batch"}` in their
  `#sdy.sharding`, as `jax.grad` of a `reduced` parameter gives: each device holds a partial
  sum) are summed over those axes first, one all_reduce each (XLA combines them); the manual
  computation's in_shardings keep the unreduced axes.

Three jobs, one module each: layout analysis and every check (`sgdgen.passes.layouts`,
before anything changes), type localization (`sgdgen.passes.localize`), and the collectives
inserted here with `sgdgen.passes.collectives`. The mesh is the module's one `sdy.mesh`,
whatever its symbol name. On a one-device mesh (no axes, or every axis of size 1) the
local program is the global one and nothing is added, no manual computation either: JAX
emits none there, and XLA cannot run one in a program it never partitions.

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

from typing import Any

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

from sgdgen.passes import register
from sgdgen.passes.attrs import UNREDUCED_AXES
from sgdgen.passes.collectives import Collectives
from sgdgen.passes.common import guarded, module_of
from sgdgen.passes.layouts import Analysis, analyze, rank
from sgdgen.passes.localize import localize_values, wrap_in_manual_computation

NAME = "sgd-insert-collectives"


def _source_tensor(partial: ir.Operation) -> ir.Value | None:
    """The tensor a norm partial sums over: up its def chain through scalar ops (past
    constants) to the first non-scalar value; a scalar argument is its own source."""

    def search(v: ir.Value) -> ir.Value | None:
        if rank(v) > 0 or isinstance(v.owner, ir.Block):
            return v
        if v.owner.name == "stablehlo.constant":
            return None
        for operand in v.owner.operands:
            found = search(operand)
            if found is not None:
                return found
        return None

    return search(partial.results[0])


def reduce_unreduced_gradients(a: Analysis, inner: ir.Block, c: Collectives) -> None:
    """Sums each gradient that arrives unreduced (a partial sum) over its unreduced axes, first
    thing in the body (before any norm partial reads it), by an all_reduce tagged
    `sgdgen.unreduced_axes`. One all_reduce per gradient: a variadic all_reduce inside the
    manual computation fails XLA's sharding validation ("Sharding is tuple-shaped but validation
    shape is not", jax 0.10.2), and XLA's all-reduce combiner merges them in the compiled program."""
    with ir.InsertionPoint.at_block_begin(inner), a.main.location:
        for k, axes in enumerate(a.in_unreduced):
            live = [ax for ax, size in a.mesh.axes if ax in axes and size > 1]  # size 1: already the sum
            if not live:
                continue
            arg = inner.arguments[k]
            total = c.all_reduce_sum(arg, live)
            op = total.owner.operation
            op.attributes[UNREDUCED_AXES] = ir.ArrayAttr.get([ir.StringAttr.get(ax) for ax in live])
            arg.replace_all_uses_except(total, op)


def insert_norm_collectives(a: Analysis, inner: ir.Block, c: Collectives | None = None) -> None:
    """Masks each partial duplicated over replicated axes, then ONE all_reduce of the joined norms
    (`c`: the builder, shared so that channel handles stay unique)."""
    if not a.partials:
        return
    c = c if c is not None else Collectives(a.mesh.axes)
    with ir.InsertionPoint.at_block_begin(inner), a.main.location:
        pid = stablehlo.partition_id()
    masked_of: dict[ir.Operation, ir.Value] = {}
    for p in a.partials:
        source = _source_tensor(p)
        used = {ax for d in (a.value_layout(source) if source is not None else ()) for ax in d}
        replicated = [ax for ax, size in a.mesh.axes if ax not in used and size > 1]
        if not replicated:
            continue
        v = p.results[0]
        with ir.InsertionPoint.after(p), p.location:
            keep = c.is_first(pid, replicated)
            zero = stablehlo.constant(ir.DenseElementsAttr.get_splat(
                v.type, ir.FloatAttr.get(ir.RankedTensorType(v.type).element_type, 0.0)))
            masked = stablehlo.select(keep, v, zero)
        v.replace_all_uses_except(masked, masked.owner.operation)
        masked_of[p] = masked
    # The value to sum over devices: the join of all partials (masked, when it is itself one).
    total = masked_of.get(a.norms[0], a.norms[0].results[0])
    with ir.InsertionPoint.after(total.owner), total.owner.location:
        reduced = c.all_reduce_sum(total)
    total.replace_all_uses_except(reduced, reduced.owner.operation)


def _partition(op: Any) -> None:
    """Analyze layouts; on more than one device, localize @main into a manual computation and
    reduce all norms with one all_reduce."""
    a = analyze(module_of(op))
    if a.mesh.device_count == 1:
        return
    inner = wrap_in_manual_computation(a)
    localize_values(a)
    c = Collectives(a.mesh.axes)
    reduce_unreduced_gradients(a, inner, c)
    insert_norm_collectives(a, inner, c)


run = register(NAME, "Partition @main into a per-device sdy.manual_computation; reduce all norms with one "
                     "all_reduce (a one-device mesh is left unpartitioned).")(guarded(NAME, _partition))
