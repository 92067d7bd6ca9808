"""The generator: SGDConfig + Mesh + [VarSpec] -> the stage-0 StableHLO module.

Stage 0 is the "global view": one private function per stage per variable class
(variables of the same shape, dtype and layout share them), rendered from
templates/*.mlir.j2, and a public @main that calls them in SEMANTICS.md §4's order
with `#sdy.sharding` on every argument and result. Its calling convention is
`sgdgen.codegen.abi.StepABI`. The text is parsed and verified with jaxlib's MLIR bindings;
nothing here traces Python with JAX.

The rules are emitted by `sgdgen.codegen.rules` (one emitter each), schedules by
`sgdgen.codegen.schedule_params` (one entry per schedule class), constants by
`sgdgen.codegen.constants`. Every step here is linear in the number of variables.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from sgdgen._version import __version__
from sgdgen.codegen.abi import StepABI
from sgdgen.codegen.rules import RULES, WIDE, Step
from sgdgen.codegen.schedule_params import render_schedule
from sgdgen.errors import ConfigError
from sgdgen.codegen.templating import GenerateError, hex_literal, render, template_names
from sgdgen.frontend.spec import Mesh, VarSpec
from sgdgen.passes import attrs


def _check(config: Any, variables: Sequence[VarSpec], mesh: Mesh) -> None:
    if not variables:
        raise GenerateError("no variables: give at least one variable to build a step for")
    counts = Counter(v.name for v in variables)
    dup = sorted(n for n, k in counts.items() if k > 1)
    if dup:
        raise GenerateError(f"variable {dup[0]!r} is listed twice; every variable needs a unique name")
    for v in variables:
        if v.layout.mesh != mesh:
            raise GenerateError(f"variable {v.name!r} is laid out on mesh {v.layout.mesh}, not on the step's mesh "
                                f"{mesh}; build its Layout on the same mesh")
    if config.clip_mode == "global_clipnorm":
        dtypes = sorted({v.dtype for v in variables})
        if len(dtypes) > 1:
            raise GenerateError(
                f"global_clipnorm needs every gradient in one dtype (tf.clip_by_global_norm stacks the norms), "
                f"but the variables have {dtypes}; use clipnorm, or keep all variables in one dtype"
            )


def module_attributes(mesh: Mesh) -> str:
    """The module's attribute list: partition counts for XLA, the generating version."""
    return (f"mhlo.num_partitions = {mesh.size} : i32, mhlo.num_replicas = 1 : i32, "
            f'{attrs.VERSION} = "{__version__}"')


def _signature(s: Step) -> dict[str, str]:
    """@main's arguments, results and return line, in ABI order, each with its sharding."""

    def sharded(slot: Any) -> str:
        return f"{{{attrs.SHARDING} = {slot.sdy_text()}}}"

    ret_vals = ", ".join(s.results[(slot.role, slot.var)] for slot in s.abi.outputs)
    ret_types = ", ".join(slot.mlir_type for slot in s.abi.outputs)
    return {
        "args": ",\n      ".join(f"%arg{k}: {slot.mlir_type} {sharded(slot)}" for k, slot in enumerate(s.abi.inputs)),
        "results": ",\n      ".join(f"{slot.mlir_type} {sharded(slot)}" for slot in s.abi.outputs),
        "ret": f"return {ret_vals} : {ret_types}",
    }


def generate_text(config: Any, variables: Sequence[VarSpec], mesh: Mesh | None = None,
                  unreduced_gradients: Sequence[Sequence[str]] = (),
                  gradient_segments: Sequence[Any] = ()) -> str:
    """The stage-0 module as text. See `generate` for the parsed, verified module.
    `unreduced_gradients`: per variable, the axes its gradient arrives unreduced over
    (`StepABI.create`); they appear in the gradient arguments' `#sdy.sharding`.
    `gradient_segments`: per variable, None or the pieces its gradient arrives in (`StepABI.create`)."""
    mesh = mesh if mesh is not None else (variables[0].layout.mesh if variables else Mesh(()))
    _check(config, variables, mesh)
    try:
        abi = StepABI.for_config(variables, mesh, config, stage0=True, unreduced_gradients=unreduced_gradients,
                                 gradient_segments=gradient_segments)
    except (ValueError, ConfigError) as e:
        raise GenerateError(str(e)) from e
    step = Step(config, variables, abi)
    for rule in RULES:
        rule(step)
    sig = _signature(step)
    step.b.emit(sig["ret"])
    return render("module", mesh=mesh.sdy_mesh_text(), attributes=module_attributes(mesh),
                  functions=list(step.b.functions.values()), args=sig["args"], results=sig["results"],
                  body="\n".join(step.b.body), state_count=len(abi.outputs))


def generate(config: Any, variables: Sequence[VarSpec], mesh: Mesh | None = None, ctx: Any = None) -> Any:
    """The stage-0 module, parsed and verified (a `jaxlib.mlir.ir.Module`)."""
    from sgdgen.codegen.ir import parse_module

    return parse_module(generate_text(config, variables, mesh), ctx)


__all__ = ["GenerateError", "WIDE", "generate", "generate_text", "hex_literal", "render", "render_schedule",
           "template_names"]
