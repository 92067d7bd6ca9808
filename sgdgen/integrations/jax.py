"""The optimizer step as a pure JAX function over pytrees, for a user's own `jax.jit`.

    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9), params, mesh=mesh)
    state = step.init(params)
    params, state = step(params, grads, state, lr=0.05)     # eager, or inside jax.jit

With `buckets=True` the small replicated parameters are packed into a few flat buffers
(sgdgen.frontend.buckets) and the program steps those: `step.flatten(params)` gives the
buffers (a `FlatParams`), `step.unflatten(flat)` the pytree (static slices XLA fuses into
their readers). Differentiate with respect to the flat buffers and the step takes and returns
them as they are, a handful of arrays whatever the number of leaves; per-leaf params and grads
are accepted too and packed in the program.

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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from sgdgen import backend
from sgdgen.api.sgd import SGD
from sgdgen.codegen.abi import StepABI, StepState
from sgdgen.frontend import buckets as bucketing
from sgdgen.frontend.zero import pad, unpad
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


def _concrete(values: Sequence[Any]) -> bool:
    """Whether every value is a concrete array this process can read whole (not a tracer)."""
    import jax

    return not any(isinstance(x, jax.core.Tracer) for x in values) and all(
        getattr(x, "is_fully_addressable", True) for x in values)


def _like(x: Any, layout: Layout) -> Any:
    """`layout` as a sharding on the mesh `x` is laid out on (keeping that mesh's axis types, which
    explicit-sharding mode compares), else on the layout's own mesh."""
    from jax.sharding import NamedSharding

    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and dict(sharding.mesh.shape) == layout.mesh.shape:
        return NamedSharding(sharding.mesh, layout.partition_spec())
    return layout.named_sharding()


class FlatParams(NamedTuple):
    """A bucketed step's parameters as its program holds them: one array per buffer (a flat
    bucket, or a large leaf as it is), in `step.plan.buckets` order. A pytree (a NamedTuple)."""

    buffers: tuple[Any, ...]


@dataclass(frozen=True)
class JaxStep:
    """The SGD step of one program as a pure function of pytrees (see `jax_step`).

    `state.momenta` and `state.averages` hold one array per buffer of the program: per
    parameter leaf, in the order of `jax.tree_util.tree_leaves(params)`, or with buckets per
    `plan.buckets` entry (`per_variable(state)` gives them per leaf).
    """

    program: StepProgram
    treedef: Any
    plan: bucketing.BucketPlan | None = None

    @property
    def abi(self) -> StepABI:
        return self.program.abi

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter leaves' names ("dense/kernel"), in leaf order."""
        return tuple(v.name for v in (self.plan.variables if self.plan is not None else self.program.variables))

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
        return _variant(self.program, "unreduced_gradients", tuple(unreduced)) if any(unreduced) else self.program

    def _buffers(self, tree: Any, what: str) -> tuple[list[Any], bool]:
        """The program's per-buffer values of params or grads, and whether they came flat."""
        import jax.numpy as jnp

        if isinstance(tree, FlatParams):
            if self.plan is None:
                raise StepInputError(f"{what} are FlatParams, but this step was built without buckets; pass the "
                                     "pytree, or build the step with jax_step(..., buckets=True)")
            if len(tree.buffers) != len(self.plan.buckets):
                raise StepInputError(f"{what} hold {len(tree.buffers)} buffers, but the step's plan has "
                                     f"{len(self.plan.buckets)}; make them with this step's flatten()")
            return list(tree.buffers), True
        leaves = self._leaves(tree, what)
        if self.plan is None:
            return leaves, False
        self._check_shapes(leaves, what)
        if _concrete(leaves):  # eager: through the host (XLA took 14 s to compile a 6,400-way concatenate)
            plan = self.plan
            packed = plan.pack([x if m.own else np.asarray(x) for x, m in zip(leaves, plan.members)])
            return [b if plan.members[c[0]].own else backend.device_put(b, _like(leaves[c[0]], spec.layout))
                    for b, c, spec in zip(packed, plan.contents, plan.buckets)], False
        return self.plan.pack(leaves, jnp), False

    def _check_shapes(self, leaves: Sequence[Any], what: str) -> None:
        """Each leaf has its variable's shape, or an error naming it (`what`: "params" / "grads")."""
        for i, (leaf, m) in enumerate(zip(leaves, self.plan.members)):
            if tuple(leaf.shape) != m.shape:
                name = self.plan.variables[i].name
                raise StepInputError(f"{what[:-1]} {name!r}: shape {list(leaf.shape)} does not match the step's "
                                     f"{list(m.shape)}")

    def _segmented(self, grads: Any) -> tuple[StepProgram, list[Any]] | None:
        """Under a trace, a bucketed step's per-leaf gradients go to the program that takes each
        flat bucket's gradient as its members' gradients (`StepABI` gradient segments): the
        concatenate is inside the step, where the CPU kernels read the pieces in place instead of
        XLA writing it out. None (the gradients are packed first) for FlatParams, eager values,
        or gradients that arrive unreduced."""
        import jax

        if self.plan is None or isinstance(grads, FlatParams):
            return None
        leaves = self._leaves(grads, "grads")
        if _concrete(leaves):
            return None
        self._check_shapes(leaves, "grads")
        for leaf in leaves:
            spec = getattr(getattr(jax.typeof(leaf), "sharding", None), "spec", None)
            if getattr(spec, "unreduced", None):
                return None
        plan = self.plan
        buffers = [leaves[c[0]] if plan.members[c[0]].own else [leaves[k] for k in c] for c in plan.contents]
        return _variant(self.program, "gradient_segments", plan.gradient_segments()), buffers

    def _unpack(self, buffers: Sequence[Any]) -> list[Any]:
        """Per-leaf values of the buffers: static slices under a trace; eagerly, host views placed
        as each leaf (replicated), one transfer per leaf and no compile."""
        import jax.numpy as jnp

        if not _concrete(buffers):
            return self.plan.unpack(buffers, jnp)
        hosts = [b if self.plan.members[c[0]].own else np.asarray(b) for b, c in zip(buffers, self.plan.contents)]
        return [v if m.own else backend.device_put(v, _like(buffers[m.bucket], spec.layout))
                for v, m, spec in zip(self.plan.unpack(hosts), self.plan.members, self.plan.variables)]

    def flatten(self, params: Any) -> FlatParams:
        """The parameters as the bucketed program holds them (traceable; a copy into the buckets)."""
        if self.plan is None:
            raise ConfigError("this step has no buckets; build it with jax_step(..., buckets=True) to flatten")
        buffers, flat = self._buffers(params, "params")
        if flat:
            return params
        placed = [primitive.placed(b, self.abi.inputs[self.abi.index("variable", k)]) for k, b in enumerate(buffers)]
        return FlatParams(tuple(placed))

    def unflatten(self, flat: FlatParams) -> Any:
        """The parameter pytree of a `FlatParams` (static slices: inside a jit, fused into their readers)."""
        import jax

        buffers, _ = self._buffers(flat, "params")
        leaves = self._unpack(buffers) if self.plan is not None else buffers
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def per_variable(self, state: StepState) -> StepState:
        """The state with one momentum (and average) per parameter leaf, in leaf order and in the
        leaf's shape (weight-update sharding's padding dropped): what a checkpoint of this step
        holds, bucketed or not, sharded or not."""
        import jax.numpy as jnp

        abi = self.abi

        def logical(role: str, values: Sequence[Any]) -> tuple[Any, ...]:
            values = [unpad(abi.slot(role, k).plan, v, jnp) for k, v in enumerate(values)]
            return tuple(self.plan.unpack(values, jnp) if self.plan is not None else values)

        return state._replace(momenta=logical("momentum", state.momenta),
                              averages=logical("average", state.averages) if state.averages else ())

    def from_per_variable(self, state: StepState) -> StepState:
        """The inverse of `per_variable`: a per-leaf state in this step's buffers and layouts."""
        import jax.numpy as jnp

        abi = self.abi

        def buffers(role: str, values: Sequence[Any]) -> tuple[Any, ...]:
            values = self.plan.pack(values, jnp) if self.plan is not None else list(values)
            return tuple(primitive.placed(pad(abi.slot(role, k).plan, v, jnp), abi.slot(role, k))
                         for k, v in enumerate(values))

        return state._replace(momenta=buffers("momentum", state.momenta),
                              averages=buffers("average", state.averages) if state.averages else ())

    def init(self, params: Any, iterations: int = 0) -> StepState:
        """A fresh state: iterations (int32, int64 with x64), zero momenta and EMA averages equal to
        the params, each laid out as its parameter (per buffer with buckets), a zero `skipped`
        counter with skip_nonfinite. `params`: the pytree, or FlatParams. Traceable."""
        import jax.numpy as jnp

        leaves, _ = self._buffers(params, "params")
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
        param_buffers, flat = self._buffers(params, "params")
        segmented = self._segmented(grads)
        if segmented is not None:
            program, grad_buffers = segmented
        else:
            grad_buffers, _ = self._buffers(grads, "grads")
            program = self.program_for(grad_buffers)
        args = program.abi.pack(state, param_buffers, grad_buffers, lr)
        new_params, new_state = program.abi.unpack(primitive.apply(program, args))
        if flat:
            return FlatParams(tuple(new_params)), new_state
        if self.plan is not None:
            new_params = self._unpack(new_params)
        return jax.tree_util.tree_unflatten(self.treedef, new_params), new_state


@functools.lru_cache(maxsize=64)
def _variant(program: StepProgram, field: str, value: Any) -> StepProgram:
    """`program` with its gradients' form `field` set to `value` (`unreduced_gradients`: per
    variable, the axes its gradient arrives unreduced over; `gradient_segments`: the pieces a flat
    bucket's gradient arrives in); one object per key, so its abi and lowered text are built once."""
    return dataclasses.replace(program, **{field: value})


def jax_step(config: Any = None, params_like: Any = None, *, mesh: Any = None, layouts: Any = None,
             exclude_from_weight_decay: Sequence[str] = (), buckets: bool = False,
             bucket_threshold: int = bucketing.DEFAULT_THRESHOLD, **sgd_kwargs: Any) -> JaxStep:
    """The sgdgen SGD step for parameters shaped like `params_like` (a pytree of arrays or
    `jax.ShapeDtypeStruct`s), as a pure JAX function.

    config: an `SGDConfig`, an `sgdgen.SGD` (its config), a dict of SGD arguments, or None with
      the arguments as keywords (`jax_step(None, params, learning_rate=0.1, momentum=0.9)`).
    mesh: a `Mesh`, "batch=2,model=4", a dict or a `jax.sharding.Mesh`; default: the leaves' mesh.
    layouts: a pytree like params of `Layout`s, `PartitionSpec`s or DTensor specs (None entries:
      from the leaf's NamedSharding, else replicated).
    exclude_from_weight_decay: regular expressions; a leaf whose name ("dense/kernel") matches one
      (`re.search`) gets no weight decay.
    buckets: pack the replicated leaves of fewer than `bucket_threshold` elements into flat
      buffers, one per (dtype, weight decay) group (sgdgen.frontend.buckets); no effect with
      clipnorm, which clips each leaf by its own norm.
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
    duplicate = {n for n, k in Counter(names).items() if k > 1}
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
    if not buckets:
        return JaxStep(StepProgram(cfg, tuple(specs), step_mesh), treedef)
    plan = bucketing.plan(specs, step_mesh, threshold=bucket_threshold, per_variable_norms=cfg.clipnorm is not None)
    return JaxStep(StepProgram(cfg, plan.buckets, step_mesh), treedef, plan)


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


__all__ = ["FlatParams", "JaxStep", "check_in_place", "jax_step"]
