"""One place that makes MLIR contexts and parses modules with jaxlib's bindings.

Every IR object of sgdgen lives in a context made here, with the dialects the step
uses (func, stablehlo, sdy, chlo, ...) registered once. Multithreading is left off,
as JAX does, so that Python-defined passes run on the calling thread.
"""

from __future__ import annotations

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import chlo, sdy, stablehlo

from sgdgen import backend


def make_context() -> ir.Context:
    """A fresh context with every dialect a step module may contain."""
    registry = ir.DialectRegistry()
    backend.register_jax_dialects(registry)
    ctx = ir.Context()
    ctx.append_dialect_registry(registry)
    ctx.load_all_available_dialects()
    stablehlo.register_dialect(ctx)
    sdy.register_dialect(ctx)
    chlo.register_dialect(ctx)
    ctx.enable_multithreading(False)
    return ctx


def parse_module(text: str, ctx: ir.Context | None = None) -> ir.Module:
    """Parses and verifies a module; raises `jaxlib.mlir.ir.MLIRError` with diagnostics on failure."""
    ctx = ctx or make_context()
    with ctx:
        module = ir.Module.parse(text)
        module.operation.verify()
    return module

