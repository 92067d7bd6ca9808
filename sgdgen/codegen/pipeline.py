"""The pass pipeline: one place that names it, and a parser that mixes sgdgen's
Python-defined passes with upstream MLIR passes in one pipeline string.

Python-defined passes are not in MLIR's global registry, so the textual pipeline
parser does not know them. `build_pass_manager` splits the top-level elements of
`builtin.module(...)`: sgdgen pass names are added as Python passes, every other
element is handed to MLIR's own parser (so options and nested pipelines work).
"""

from __future__ import annotations

import functools

from jaxlib.mlir import ir, passmanager

from sgdgen.errors import PipelineError
from sgdgen.codegen.ir import make_context

#: stage 0 -> stage 1: fuse, partition, update in place, then tidy up. canonicalize walks
#: bottom-up: its default top-down walk re-orders the constants it meets mid-block and grew
#: as N^2 on a weight-update-sharded module (51 s at 6,400 variables; 1.0 s bottom-up).
DEFAULT_PIPELINE = (
    "builtin.module(sgd-fuse-step,sgd-insert-collectives,sgd-alias-buffers,canonicalize{top-down=false},cse,"
    "symbol-dce)"
)


def split_elements(text: str) -> list[str]:
    """Top-level comma-separated elements, respecting (), {} and quotes."""
    out, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_options(element: str, name: str, known: tuple[str, ...]) -> dict[str, str]:
    """The options of an sgdgen pass element, MLIR's syntax: `name{key=value other=value}`."""
    rest = element[len(name):].strip()
    if not rest:
        return {}
    if not known:
        raise PipelineError(f"pass {name} takes no options (got {element!r})")
    if not (rest.startswith("{") and rest.endswith("}")):
        raise PipelineError(f"pass {name}: options go in braces, e.g. {name}{{{known[0]}=...}} (got {element!r})")
    options: dict[str, str] = {}
    for item in rest[1:-1].split():
        key, eq, value = item.partition("=")
        if key not in known or not eq or not value:
            raise PipelineError(f"pass {name}: unknown or empty option {item!r}; it takes {', '.join(known)} "
                                f"(e.g. {name}{{{known[0]}=...}})")
        options[key] = value
    return options


def _anchored_elements(pipeline: str) -> list[str]:
    p = pipeline.strip()
    if p.startswith("builtin.module(") and p.endswith(")"):
        p = p[len("builtin.module("):-1]
    elif "(" in p.split(",")[0] and not p.startswith(("func.func(", "any(")):
        raise PipelineError(f"pipeline {pipeline!r}: anchor it on builtin.module, e.g. builtin.module(sgd-fuse-step)")
    return split_elements(p)


def build_pass_manager(pipeline: str, ctx: ir.Context) -> passmanager.PassManager:
    """A PassManager on builtin.module running `pipeline` (sgdgen and upstream passes)."""
    from sgdgen.passes import PASSES

    with ctx:
        pm = passmanager.PassManager("builtin.module")
        for element in _anchored_elements(pipeline):
            name = element.split("{", 1)[0].split("(", 1)[0].strip()
            if name in PASSES:
                info = PASSES[name]
                options = parse_options(element, name, info.options)
                run = functools.partial(info.run, **options) if options else info.run
                pm.add(run, name=name, argument=name, description=info.summary)
            else:
                try:
                    pm.add(element)
                except ValueError as e:
                    raise PipelineError(str(e).strip()) from e
    return pm


def pipeline_for(shard_update_over: str | None = None) -> str:
    """The default pipeline, with weight-update sharding over `shard_update_over` when given
    (after partitioning, before the in-place aliasing)."""
    if not shard_update_over:
        return DEFAULT_PIPELINE
    return DEFAULT_PIPELINE.replace("sgd-insert-collectives,",
                                    f"sgd-insert-collectives,sgd-shard-weight-update{{axis={shard_update_over}}},")


def run_pipeline(text: str, pipeline: str = DEFAULT_PIPELINE, ctx: ir.Context | None = None) -> str:
    """Parses `text`, runs `pipeline` over it, and returns the printed module."""
    from sgdgen.codegen.ir import parse_module

    ctx = ctx or make_context()
    module = parse_module(text, ctx)
    pm = build_pass_manager(pipeline, ctx)
    with ctx:
        pm.run(module.operation)
        return str(module)


def lower(module: ir.Module, pipeline: str = DEFAULT_PIPELINE) -> ir.Module:
    """Runs `pipeline` in place on a parsed module and returns it."""
    ctx = module.context
    pm = build_pass_manager(pipeline, ctx)
    with ctx:
        pm.run(module.operation)
    return module
