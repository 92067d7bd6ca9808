"""The step as a JAX primitive: sgdgen's lowered module inside a user's `jax.jit` or `jax.export`.

`step_primitive()` takes the step's arguments in `StepABI` order and returns its results in that
order. Its abstract evaluation returns the state arguments' avals (result k updates
argument k, so it has argument k's shape, dtype and, in explicit-sharding mode, sharding);
its lowering merges `module_text(program)` (the pass-rewritten module, the same text
`sgdgen-opt`, the artifact and `StepExecutable` use) into the program JAX is building and
calls its @main (sgdgen.backend.register_module_call_lowering). No maths is re-implemented.

Boundaries:
- `iterations` may be int32 (JAX without x64) or int64: the lowering converts it to the
  module's int64 and back, so the caller's counter keeps its width (int32 wraps after 2**31 steps).
- The learning rate is an operand (float32), never a constant: changing it does not recompile.
- Inputs laid out otherwise than the step's layouts are resharded to them (a sharding
  constraint before the call), as `jax.export` does for its modules: inside a user's jit the
  layout is a compile-time fact, and a reshard is what jit does for any such mismatch.
- A gradient the program declares unreduced (`Slot.unreduced`) is taken unreduced: in
  explicit-sharding mode it is resharded to the slot's layout with those axes still unreduced
  (a no-op for `jax.grad`'s own unreduced gradient), never summed before the call.
- Shardy must be on (`jax_use_shardy_partitioner`): the module speaks `sdy`.
- In-place update is the caller's `donate_argnums` (a merged function's `tf.aliasing_output`
  is ignored by XLA): `sgdgen.check_in_place` reads the compiled program's alias table.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from sgdgen import backend
from sgdgen.codegen.abi import COUNTER_ROLES, Slot, StepABI
from sgdgen.errors import BackendError, ConfigError, StepInputError, StepTypeError
from sgdgen.runtime.executable import slot_dtype
from sgdgen.runtime.program import StepProgram

#: What a disabled Shardy partitioner is refused with.
SHARDY_REQUIRED = ("sgdgen's step is a Shardy module (sdy.mesh, sdy.sharding), but Shardy is disabled "
                   "(jax_use_shardy_partitioner=False); enable it with "
                   "jax.config.update('jax_use_shardy_partitioner', True) or JAX_USE_SHARDY_PARTITIONER=true")

#: The 1-device pipeline while sgd-insert-collectives still wraps one device's body in a
#: size-1 sdy.manual_computation, which a program that is never partitioned cannot run
#: (INTEGRATION-NOTES §1): the same passes without the partitioning one.
_ONE_DEVICE_PIPELINE = "builtin.module(sgd-fuse-step,sgd-alias-buffers,canonicalize,cse,symbol-dce)"


@functools.lru_cache(maxsize=256)
def module_text(program: StepProgram) -> str:
    """The StableHLO text the primitive calls: `program.lowered_text`, except on one device
    while that text still holds an `sdy.manual_computation` (then the pipeline without
    sgd-insert-collectives, which on one device has nothing to partition or reduce)."""
    text = program.lowered_text
    if program.mesh.size == 1 and "sdy.manual_computation" in text:
        from sgdgen.codegen.pipeline import run_pipeline

        text = run_pipeline(program.signature.stage0_text, _ONE_DEVICE_PIPELINE)
    return text


def require_shardy() -> None:
    if not backend.shardy_enabled():
        raise ConfigError(SHARDY_REQUIRED)


def _check_aval(slot: Slot, aval: Any) -> None:
    what = f"{slot.role} {slot.name!r}"
    shape, dtype = tuple(aval.shape), np.dtype(aval.dtype)
    if shape != slot.shape:
        raise StepInputError(f"{what}: shape {list(shape)} does not match the step's {list(slot.shape)}")
    if slot.role in COUNTER_ROLES:
        if dtype.kind not in "iu":
            raise StepTypeError(f"{what}: dtype {dtype} is not an integer; pass the state's {slot.role} "
                                "(int32, or int64 with x64)")
    elif dtype != slot_dtype(slot):
        raise StepTypeError(f"{what}: dtype {dtype} does not match the step's {slot_dtype(slot)}; "
                            f"cast it with .astype({slot_dtype(slot)})")


def _abstract_eval(*avals: Any, program: StepProgram) -> list[Any]:
    abi = program.abi
    if len(avals) != len(abi.inputs):
        raise StepInputError(f"the step takes {len(abi.inputs)} arguments, got {len(avals)}")
    for slot, aval in zip(abi.inputs, avals):
        _check_aval(slot, aval)
    return [aval.update(weak_type=False) for aval in avals[:len(abi.outputs)]]


def _lowered_module(ctx: Any, *, program: StepProgram) -> str:
    require_shardy()
    n = backend.lowering_device_count(ctx)
    if n != program.mesh.size:
        raise BackendError(f"the step was built for mesh {program.mesh or '(one device)'} ({program.mesh.size} "
                           f"device(s)) but the program being compiled runs on {n}; build the step on the "
                           "mesh your jit runs on")
    text = module_text(program)
    if backend.lowering_for_cpu_executable(ctx):  # the same kernel calls as a stand-alone CPU executable
        from sgdgen.runtime import cpu_kernels

        text = cpu_kernels.rewrite(text)
    return text


@functools.cache
def step_primitive() -> Any:
    """The `sgdgen_step` primitive, defined (and its lowering registered) on first use, so that
    `import sgdgen` does not import jax."""
    from jax.extend.core import Primitive

    p = Primitive("sgdgen_step")
    p.multiple_results = True
    p.def_abstract_eval(_abstract_eval)
    backend.define_eager_impl(p)
    backend.register_module_call_lowering(p, _lowered_module, "sgdgen_step")
    return p


def placed(x: Any, slot: Slot) -> Any:
    """`x` constrained to the slot's layout (a no-op for an array already laid out so)."""
    import jax

    want = slot.layout.named_sharding()
    have = getattr(x, "sharding", None)
    if (not slot.unreduced and not isinstance(x, jax.core.Tracer) and have is not None
            and have.is_equivalent_to(want, len(slot.shape))):
        return x
    typed = getattr(jax.typeof(x), "sharding", None)
    context = jax.sharding.get_abstract_mesh()
    for mesh in (context, typed.mesh if typed is not None else None):
        if mesh is not None and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
            # Explicit-sharding mode: the layout is part of the type, on the caller's mesh;
            # change it with reshard, to the step's layout on that mesh.
            if dict(mesh.shape) != slot.layout.mesh.shape:
                raise StepInputError(f"{slot.role} {slot.name!r} is typed on mesh {dict(mesh.shape)}, but the step "
                                     f"is built for {slot.layout.mesh.shape}; build the step on the mesh you trace "
                                     "with")
            spec = slot.layout.partition_spec()
            if slot.unreduced:
                spec = jax.sharding.PartitionSpec(*spec, unreduced=frozenset(slot.unreduced))
            return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
    if slot.unreduced:
        raise StepInputError(f"{slot.role} {slot.name!r}: the step takes it unreduced over {list(slot.unreduced)}, "
                             "which only JAX's explicit-sharding mode can express; trace under "
                             "jax.set_mesh(a mesh with AxisType.Explicit axes), or use the program without "
                             "unreduced_gradients")
    if slot.layout.mesh.size == 1:
        # One device: nothing to place, and a constraint would spread the step's one-device
        # NamedSharding over the caller's whole program (Keras' metrics, its learning rate), so
        # that the caller's next call, with plain single-device inputs, compiles again.
        return x
    return jax.lax.with_sharding_constraint(x, want)


def apply(program: StepProgram, args: Sequence[Any]) -> list[Any]:
    """Binds the step to `args` (StepABI order; a float learning rate becomes a float32 operand);
    returns the results in `abi.outputs` order. Traceable: eager, under jit, under export."""
    import jax.numpy as jnp

    require_shardy()
    abi: StepABI = program.abi
    if len(args) != len(abi.inputs):
        raise StepInputError(f"the step takes {len(abi.inputs)} arguments, got {len(args)}")
    args = list(args)
    if abi.lr_input:
        args[-1] = jnp.asarray(args[-1], jnp.float32)
    for slot, a in zip(abi.inputs, args):
        _check_aval(slot, a)
    placed_args = [placed(a, s) for a, s in zip(args, abi.inputs)]
    return step_primitive().bind(*placed_args, program=program.signature)


__all__ = ["SHARDY_REQUIRED", "apply", "module_text", "placed", "require_shardy", "step_primitive"]
