"""`sgd-alias-buffers`: every state result of @main updates its argument in place.

@main's first `sgdgen.state_count` arguments are the state (iterations, variables,
momenta, EMA averages; `sgdgen.codegen.abi.StepABI`), and result k is the new value of
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
from sgdgen.passes.attrs import ALIASING_OUTPUT as ALIAS, SHARDING, STATE_COUNT
from sgdgen.passes.common import PassError, find_main, guarded, int_attr, module_of

NAME = "sgd-alias-buffers"


def _dicts(func: ir.Operation, key: str, n: int) -> list[dict[str, ir.Attribute]]:
    if key not in func.attributes:
        return [{} for _ in range(n)]
    return [{a.name: a.attr for a in ir.DictAttr(d)} for d in ir.ArrayAttr(func.attributes[key])]


def _alias(op: Any) -> None:
    """Mark state argument k as aliased to result k, after checking the pair matches."""
    main = find_main(module_of(op))
    count = int_attr(main, STATE_COUNT)
    if count is None:
        raise PassError(f"@main has no {STATE_COUNT} attribute, so which arguments are state is unknown; "
                        "emit the module with sgdgen emit", main)
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)
    in_types, out_types = list(ftype.inputs), list(ftype.results)
    if count > len(out_types) or count > len(in_types):
        raise PassError(f"{STATE_COUNT} = {count} but @main has {len(in_types)} arguments and "
                        f"{len(out_types)} results", main)
    args = _dicts(main, "arg_attrs", len(in_types))
    results = _dicts(main, "res_attrs", len(out_types))
    i32 = ir.IntegerType.get_signless(32)
    for k in range(count):
        if in_types[k] != out_types[k]:
            raise PassError(f"state argument {k} has type {in_types[k]} but result {k} has type "
                            f"{out_types[k]}; a buffer can only be updated in place by a value of its type", main)
        a, r = (str(d[SHARDING]) if SHARDING in d else None for d in (args[k], results[k]))
        if a != r:
            raise PassError(f"state argument {k} is sharded as {a} but result {k} as {r}; an in-place update "
                            "keeps the layout", main)
        if ALIAS in args[k] and ir.IntegerAttr(args[k][ALIAS]).value != k:
            raise PassError(f"argument {k} is already aliased to result {ir.IntegerAttr(args[k][ALIAS]).value}",
                            main)
        args[k][ALIAS] = ir.IntegerAttr.get(i32, k)
    main.attributes["arg_attrs"] = ir.ArrayAttr.get([ir.DictAttr.get(d) for d in args])


run = register(NAME, "Alias every state argument of @main to the result that updates it (in-place update).")(
    guarded(NAME, _alias))
