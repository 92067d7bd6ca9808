"""Helpers shared by the passes: finding @main, reporting errors as diagnostics."""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from typing import Any

from jaxlib.mlir import ir


class PassError(Exception):
    """Raised inside a pass; reported at `op` as an MLIR error diagnostic."""

    def __init__(self, message: str, op: Any = None):
        super().__init__(message)
        self.op = op


def guarded(name: str, body: Any) -> Any:
    """Wraps a pass body so that a PassError becomes a diagnostic plus pass failure."""

    def run(op: Any, pass_: Any, **options: Any) -> None:
        try:
            with op.location:
                body(op, **options)
        except PassError as e:
            where = e.op if e.op is not None else op
            where.location.emit_error(f"{name}: {e}")
            pass_.signal_pass_failure()
        except Exception as e:  # a bug in the pass: still a diagnostic, never a traceback
            detail = traceback.format_exc() if os.environ.get("SGDGEN_DEBUG") else f"{type(e).__name__}: {e}"
            op.location.emit_error(f"{name}: internal error: {detail}")
            pass_.signal_pass_failure()

    run.__name__ = name.replace("-", "_")
    run.__doc__ = body.__doc__
    return run


def module_of(op: Any) -> ir.Operation:
    op = op.operation
    if op.name != "builtin.module":
        raise PassError(f"expects a builtin.module, got {op.name}", op)
    return op


def top_ops(module: ir.Operation) -> Iterator[ir.Operation]:
    yield from (o.operation for o in module.regions[0].blocks[0].operations)


def symbol_name(op: ir.Operation) -> str | None:
    if "sym_name" in op.attributes:
        return ir.StringAttr(op.attributes["sym_name"]).value
    return None


def find_main(module: ir.Operation) -> ir.Operation:
    for op in top_ops(module):
        if op.name == "func.func" and symbol_name(op) == "main":
            return op
    raise PassError("the module has no @main function; run it on a module that sgdgen emit produced", module)


def find_functions(module: ir.Operation) -> dict[str, ir.Operation]:
    return {symbol_name(op): op for op in top_ops(module) if op.name == "func.func"}


def body_block(func: ir.Operation) -> ir.Block:
    return func.regions[0].blocks[0]


def body_ops(func: ir.Operation) -> list[ir.Operation]:
    return [o.operation for o in body_block(func).operations]


def string_attr(op: ir.Operation, key: str) -> str | None:
    if key in op.attributes:
        return ir.StringAttr(op.attributes[key]).value
    return None


def int_attr(op: ir.Operation, key: str) -> int | None:
    if key in op.attributes:
        return ir.IntegerAttr(op.attributes[key]).value
    return None


def arg_attrs(func: ir.Operation, index: int, results: bool = False) -> ir.DictAttr | None:
    key = "res_attrs" if results else "arg_attrs"
    if key not in func.attributes:
        return None
    return ir.DictAttr(ir.ArrayAttr(func.attributes[key])[index])


def count_option(options: dict[str, str], name: str, default: int, op: Any) -> int:
    """Pass option `name` (a non-negative integer, `default` when absent); PassError otherwise."""
    text = options.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise PassError(f"{name} must be a non-negative integer, got {text!r}", op)
    return value
