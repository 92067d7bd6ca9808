"""`sgd-alias-buffers`: every state result of @main updates its argument in place.

@main's first `sgdgen.state_count` arguments are the state (iterations, variables,
momenta, EMA averages; `sgdgen.abi.StepABI`), and result k is the new value of
argument k. The pass checks that each such pair has the same type and sharding and
marks the argument `tf.aliasing_output = k`, which XLA turns into an input/output
alias (the buffer is donated and reused). The runtime then refuses to run a
program whose executable does not show every alias.

Input:

    func.func public @main(%arg0: tensor<i64> {sdy.sharding = ...}, ...) -> (tensor<i64> {...}, ...)
        attributes {sgdgen.state_count = 3 : i64}

Output:

    func.func public @main(%arg0: tensor<i64> {sdy.sharding = ..., tf.aliasing_output = 0 : i32}, ...)
"""

from __future__ import annotations

from typing import Any

from jaxlib.mlir import ir

from sgdgen.passes import register
from sgdgen.passes.common import PassError, arg_attrs, find_main, guarded, int_attr, module_of, set_arg_attr

NAME = "sgd-alias-buffers"
ALIAS = "tf.aliasing_output"


def _sharding(func: ir.Operation, k: int, results: bool) -> str | None:
    d = arg_attrs(func, k, results)
    return str(d["sdy.sharding"]) if d is not None and "sdy.sharding" in d else None


def _alias(op: Any) -> None:
    """Mark state argument k as aliased to result k, after checking the pair matches."""
    main = find_main(module_of(op))
    count = int_attr(main, "sgdgen.state_count")
    if count is None:
        raise PassError("@main has no sgdgen.state_count attribute, so which arguments are state is unknown; "
                        "emit the module with sgdgen emit", main)
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
    if count > len(ftype.results) or count > len(ftype.inputs):
        raise PassError(f"sgdgen.state_count = {count} but @main has {len(ftype.inputs)} arguments and "
                        f"{len(ftype.results)} results", main)
    for k in range(count):
        if ftype.inputs[k] != ftype.results[k]:
            raise PassError(f"state argument {k} has type {ftype.inputs[k]} but result {k} has type "
                            f"{ftype.results[k]}; a buffer can only be updated in place by a value of its type", main)
        if _sharding(main, k, False) != _sharding(main, k, True):
            raise PassError(f"state argument {k} is sharded as {_sharding(main, k, False)} but result {k} as "
                            f"{_sharding(main, k, True)}; an in-place update keeps the layout", main)
        existing = arg_attrs(main, k)
        if existing is not None and ALIAS in existing and ir.IntegerAttr(existing[ALIAS]).value != k:
            raise PassError(f"argument {k} is already aliased to result {ir.IntegerAttr(existing[ALIAS]).value}",
                            main)
        set_arg_attr(main, k, ALIAS, ir.IntegerAttr.get(ir.IntegerType.get_signless(32), k))


run = register(NAME, "Alias every state argument of @main to the result that updates it (in-place update).")(
    guarded(NAME, _alias))
