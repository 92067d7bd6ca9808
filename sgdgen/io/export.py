"""The step as a serialized `jax.export.Exported`: callable from any JAX process, without sgdgen.

`export_step(program, platforms)` exports the `sgdgen_step` primitive over the step's
arguments in `StepABI` order (each with its layout's sharding) and serializes it
(`Exported.serialize`, which needs the `flatbuffers` package). A consumer calls
`jax.export.deserialize(blob).call(*args)`, eagerly or inside its own jit, and gets the new
state in `abi.outputs` order. `iterations` is exported at the exporter's integer width
(int32, int64 with x64 on): the module counts in int64 and converts at the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sgdgen.errors import ArtifactError
from sgdgen.runtime import primitive
from sgdgen.runtime.executable import slot_dtype
from sgdgen.runtime.program import StepProgram

#: Platforms jax.export can lower a module for.
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def argument_specs(program: StepProgram) -> list[Any]:
    """`jax.ShapeDtypeStruct`s of the step's arguments (StepABI order), each with its sharding."""
    import jax

    specs = []
    for slot in program.abi.inputs:
        dtype = jax.dtypes.canonicalize_dtype(slot_dtype(slot))  # int64 iterations -> int32 without x64
        specs.append(jax.ShapeDtypeStruct(slot.shape, dtype, sharding=slot.layout.named_sharding()))
    return specs


def export_step(program: StepProgram, platforms: Sequence[str] = ("cpu",)) -> bytes:
    """The serialized `jax.export.Exported` of `program`'s step, lowered for `platforms`."""
    import jax

    platforms = tuple(str(p).strip().lower() for p in platforms)
    unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if not platforms or unknown:
        raise ArtifactError(f"platforms {list(platforms)}: name one or more of {list(KNOWN_PLATFORMS)} "
                            "(e.g. --platforms cpu,cuda,tpu)")

    def step(*args: Any) -> tuple[Any, ...]:
        return tuple(primitive.apply(program, args))

    exported = jax.export.export(jax.jit(step), platforms=platforms)(*argument_specs(program))
    return bytes(exported.serialize())


__all__ = ["KNOWN_PLATFORMS", "argument_specs", "export_step"]
