"""The optimizer step as a pure JAX function over pytrees, for a user's own `jax.jit`.

    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9), params, mesh=mesh)
    state = step.init(params)
    params, state = step(params, grads, state, lr=0.05)     # eager, or inside jax.jit

What runs is the generated, pass-rewritten module (`step.program.lowered_text`) called
through the `sgdgen_step` primitive (sgdgen.runtime.primitive): forward, backward and the
update compile into one XLA program. Argument order is `StepABI.pack` / `unpack`; in-place
update is the caller's `donate_argnums`, and `check_in_place` reads the compiled program
to say which optimizer buffers it would copy instead.

Gradients typed unreduced (explicit-sharding mode: `jax.grad` taken at a parameter resharded
`reduced={"batch"}` gives `float32[8,16@model]{U:batch}`) are taken as they are, by a variant
of the program that declares them unreduced (`StepProgram.unreduced_gradients`): the step sums
them itself, with one all_reduce of all of them, or, where it shards its update over that axis
(`shard_update_over`), with one reduce_scatter per variable and no all_reduce, the ZeRO step
Xu et al. 2020 describe. The variant is used with or without weight-update sharding: reducing
them before the call would cost the same all_reduce per leaf, and only the step can turn it
into a reduce_scatter.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgdgen import backend
from sgdgen.api.sgd import SGD
from sgdgen.codegen.abi import StepABI, StepState
from sgdgen.frontend.zero import pad
from sgdgen.errors import ConfigError, StepInputError
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Layout, Mesh, SpecError, VarSpec, canonical_dtype
from sgdgen.runtime import primitive
from sgdgen.runtime.program import StepProgram


def _leaf_name(path: Sequence[Any]) -> str:
    """"dense/kernel" for the leaf at params["dense"]["kernel"] (keys, indices, attribute names)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts) or "param"


def _mesh_of_leaves(leaves: Sequence[Any]) -> Mesh:
    """The mesh the leaves are laid out on: the first NamedSharding's, else the one device of
    the first committed array, else device 0."""
    from jax.sharding import NamedSharding, SingleDeviceSharding

    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and hasattr(sharding.mesh, "devices"):
            return Mesh.from_jax(sharding.mesh)
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, SingleDeviceSharding):
            return Mesh((), (next(iter(sharding.device_set)).id,))
    return Mesh(())


def _layout(name: str, leaf: Any, given: Any, mesh: Mesh) -> Layout:
    """A leaf's layout: the given one (Layout, PartitionSpec, DTensor specs or None), else its
    NamedSharding's spec, else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    rank = len(np.shape(leaf)) if not hasattr(leaf, "shape") else len(leaf.shape)
    if isinstance(given, Layout):
        if given.mesh != mesh:
            raise SpecError(f"parameter {name!r}: its layout is on mesh {given.mesh}, but the step's mesh is {mesh}; "
                            "build the layouts on the step's mesh")
        return given
    spec = given
    if spec is None:
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            if hasattr(sharding.mesh, "devices") and Mesh.from_jax(sharding.mesh) != mesh:
                raise SpecError(f"parameter {name!r} is laid out on mesh {Mesh.from_jax(sharding.mesh)}, but the step's "
                                f"mesh is {mesh}; jax.device_put it onto the step's mesh or pass mesh= to match")
            spec = sharding.spec
    if spec is None:
        return Layout.replicated(mesh, rank)
    entries = list(spec)
    if any(e is PartitionSpec.UNCONSTRAINED for e in entries):
        raise SpecError(f"parameter {name!r}: layout {spec} leaves a dimension unconstrained; the step needs every "
                        "dimension's layout: give a mesh axis or None")
    return Layout(entries + [None] * (rank - len(entries)), mesh)


def _config(config: Any, kwargs: Mapping[str, Any]) -> SGDConfig:
    if isinstance(config, (SGDConfig, SGD)) and kwargs:
        raise ConfigError(f"pass either a config or keyword arguments, not both (got {sorted(kwargs)})")
    if isinstance(config, SGD):
        return config.config
    if isinstance(config, SGDConfig):
        return config
    if isinstance(config, Mapping):
        return SGDConfig.create(**{**dict(config), **kwargs})
    if config is None:
        return SGDConfig.create(**kwargs)
    raise ConfigError(f"config must be an SGDConfig, an sgdgen.SGD, a dict of SGD arguments or None; got "
                      f"{type(config).__name__}")


@dataclass(frozen=True)
class JaxStep:
    """The SGD step of one program as a pure function of pytrees (see `jax_step`).

    `state.momenta` and `state.averages` hold one array per parameter leaf, in the
    order of `jax.tree_util.tree_leaves(params)`.
    """

    program: StepProgram
    treedef: Any

    @property
    def abi(self) -> StepABI:
        return self.program.abi

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.program.variables)

    def _leaves(self, tree: Any, what: str) -> list[Any]:
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:
            raise StepInputError(f"{what} have structure {treedef}, but the step was built for {self.treedef}; "
                                 "pass a pytree shaped like the params_like given to jax_step")
        return leaves

    def program_for(self, grad_leaves: Sequence[Any]) -> StepProgram:
        """The program for gradients like `grad_leaves`: `program`, or, where some are typed
        unreduced over mesh axes (explicit-sharding mode), its variant that takes them so
        (cached: one StepProgram, so one lowering, per combination)."""
        import jax

        unreduced = []
        for spec, leaf in zip(self.program.variables, grad_leaves):
            sharding = getattr(jax.typeof(leaf), "sharding", None)
            axes = set(getattr(getattr(sharding, "spec", None), "unreduced", None) or ())
            order = [a for a in self.program.mesh.axis_names if a in axes]
            bad = sorted(axes - set(order)) + [a for a in order if a in spec.layout.used_axes]
            if bad:
                raise StepInputError(
                    f"gradient {spec.name!r} is unreduced over {bad}, which the step cannot take: its parameter is "
                    f"laid out {spec.layout.sharding_specs} on {self.program.mesh}, and a gradient may arrive "
                    "unreduced only over mesh axes its parameter is replicated on; reduce it first, e.g. "
                    f"jax.sharding.reshard(g, {spec.layout.partition_spec()})")
            unreduced.append(tuple(order))
        return _variant(self.program, tuple(unreduced)) if any(unreduced) else self.program

    def init(self, params: Any, iterations: int = 0) -> StepState:
        """A fresh state: iterations (int32, int64 with x64), zero momenta and EMA averages equal to
        the params, each laid out as its parameter, a zero `skipped` counter with skip_nonfinite.
        Traceable (works inside jit)."""
        import jax.numpy as jnp

        leaves = self._leaves(params, "params")
        abi = self.abi
        slots = [abi.inputs[abi.index("momentum", i)] for i in range(abi.num_variables)]
        momenta = tuple(primitive.placed(jnp.zeros(s.shape, leaf.dtype), s) for s, leaf in zip(slots, leaves))
        averages = tuple(primitive.placed(pad(abi.slot("average", i).plan, jnp.array(leaf, copy=True), jnp),
                                          abi.slot("average", i))
                         for i, leaf in enumerate(leaves)) if abi.use_ema else ()
        it_slot = abi.inputs[abi.index("iterations")]
        skipped = (primitive.placed(jnp.asarray(0, dtype=int), abi.inputs[abi.index("skipped")])
                   if abi.skip_nonfinite else None)
        return StepState(primitive.placed(jnp.asarray(iterations, dtype=int), it_slot), momenta, averages, skipped)

    def __call__(self, params: Any, grads: Any, state: StepState, lr: Any = None) -> tuple[Any, StepState]:
        """One step: (new params, new state). `lr` (a float or a float32 scalar array) is a runtime
        input: pass it as an argument of your jit to change it without recompiling; None uses the
        config's learning rate. A schedule's learning rate is computed in the program (no lr)."""
        import jax

        config = self.program.config
        if config.lr_is_schedule:
            if lr is not None:
                raise ConfigError("this step computes its learning rate from a schedule; do not pass lr")
        elif lr is None:
            lr = np.float32(config.learning_rate)
        if not isinstance(state, StepState):
            raise StepInputError(f"state must be the StepState of step.init(params), got {type(state).__name__}")
        grad_leaves = self._leaves(grads, "grads")
        program = self.program_for(grad_leaves)
        args = program.abi.pack(state, self._leaves(params, "params"), grad_leaves, lr)
        new_params, new_state = program.abi.unpack(primitive.apply(program, args))
        return jax.tree_util.tree_unflatten(self.treedef, new_params), new_state


@functools.lru_cache(maxsize=64)
def _variant(program: StepProgram, unreduced: tuple[tuple[str, ...], ...]) -> StepProgram:
    """`program` taking gradients unreduced over `unreduced` (per variable); one object per key,
    so its abi and lowered text are built once."""
    return dataclasses.replace(program, unreduced_gradients=unreduced)


def jax_step(config: Any = None, params_like: Any = None, *, mesh: Any = None, layouts: Any = None,
             exclude_from_weight_decay: Sequence[str] = (), **sgd_kwargs: Any) -> JaxStep:
    """The sgdgen SGD step for parameters shaped like `params_like` (a pytree of arrays or
    `jax.ShapeDtypeStruct`s), as a pure JAX function.

    config: an `SGDConfig`, an `sgdgen.SGD` (its config), a dict of SGD arguments, or None with
      the arguments as keywords (`jax_step(None, params, learning_rate=0.1, momentum=0.9)`).
    mesh: a `Mesh`, "batch=2,model=4", a dict or a `jax.sharding.Mesh`; default: the leaves' mesh.
    layouts: a pytree like params of `Layout`s, `PartitionSpec`s or DTensor specs (None entries:
      from the leaf's NamedSharding, else replicated).
    exclude_from_weight_decay: regular expressions; a leaf whose name ("dense/kernel") matches one
      (`re.search`) gets no weight decay.
    """
    import jax

    if params_like is None:
        raise SpecError("jax_step needs params_like: a pytree of the parameters (arrays or jax.ShapeDtypeStruct)")
    cfg = _config(config, sgd_kwargs)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params_like)
    if not paths_leaves:
        raise SpecError("params_like has no leaves: the step needs at least one parameter")
    leaves = [leaf for _, leaf in paths_leaves]
    names = [_leaf_name(path) for path, _ in paths_leaves]
    duplicate = {n for n in names if names.count(n) > 1}
    if duplicate:
        raise SpecError(f"two parameters are both named {sorted(duplicate)[0]!r}; give the pytree distinct keys")
    step_mesh = Mesh.of(mesh) if mesh is not None else _mesh_of_leaves(leaves)
    given = [None] * len(leaves)
    if layouts is not None:
        given = treedef.flatten_up_to(layouts)
    specs = []
    for name, leaf, lay in zip(names, leaves, given):
        dtype = canonical_dtype(leaf.dtype, what=f"parameter {name!r}")
        decay = not any(re.search(p, name) for p in exclude_from_weight_decay)
        specs.append(VarSpec(name, tuple(leaf.shape), dtype, _layout(name, leaf, lay, step_mesh), decay))
    backend.devices_for(step_mesh.device_ids)  # the devices exist (else: how to make them)
    return JaxStep(StepProgram(cfg, tuple(specs), step_mesh), treedef)


def check_in_place(compiled: Any, *, params_argnums: Sequence[int] = ()) -> list[str]:
    """The optimizer buffers a compiled user program (`jax.jit(f).lower(...).compile()`) does not
    update in place: every leaf of each `StepState` among its arguments, and every leaf of the
    arguments at `params_argnums`, must be aliased to an output (XLA's input_output_alias
    table). Returns their paths ("args[1].momenta[0]"); empty when all are in place.
    Donate them (`jax.jit(f, donate_argnums=...)`) to fix what it reports."""
    import jax

    n = compiled.in_tree.num_leaves
    args, _ = jax.tree_util.tree_unflatten(compiled.in_tree, list(range(n)))
    wanted: list[tuple[str, int]] = []
    is_state = lambda x: isinstance(x, StepState)  # noqa: E731
    for path, node in jax.tree_util.tree_flatten_with_path(args, is_leaf=is_state)[0]:
        in_params = path and getattr(path[0], "idx", None) in params_argnums
        if is_state(node) or in_params:
            for sub, index in jax.tree_util.tree_flatten_with_path(node)[0]:
                wanted.append(("args" + jax.tree_util.keystr(tuple(path) + tuple(sub)), index))
    if not wanted:
        raise StepInputError("the compiled program takes no StepState and params_argnums is empty: nothing to "
                             "check; pass params_argnums=(position of the params argument,)")
    aliased = set(backend.input_output_aliases(compiled.runtime_executable()).values())
    param_of = backend.kept_argument_indices(compiled)
    return [name for name, index in wanted if param_of[index] is None or param_of[index] not in aliased]


__all__ = ["JaxStep", "check_in_place", "jax_step"]
