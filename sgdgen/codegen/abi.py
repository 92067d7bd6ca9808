"""The step's calling convention: the order of @main's arguments and results.

One object, `StepABI`, fixes it; the generator emits @main in this order, the passes
keep it, the artifact manifest records it and the runtime feeds and reads buffers by it.

Arguments: the state first, then the gradients, then the runtime scalars:

    iterations, variables[0..n), momenta[0..n), averages[0..n) (EMA only),
    skipped (skip_nonfinite only), gradients[0..n), learning_rate (only when the learning rate is not a schedule)

Results: the new state, in the same order as the state arguments, so result k
aliases argument k for every k (the in-place update of `sgd-alias-buffers`).
Keeping state at the front makes the aliasing table the identity prefix and leaves
room for flat buckets (one argument per role) later without reordering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from sgdgen.dtypes import mlir_element_type
from sgdgen.errors import ConfigError
from sgdgen.frontend.spec import Layout, Mesh, VarSpec, tensor_type
from sgdgen.frontend.zero import ShardPlan, shard_plan

ROLES = ("iterations", "variable", "momentum", "average", "skipped", "gradient", "learning_rate")
#: Roles whose buffers the step updates in place (donated arguments, aliased results).
STATE_ROLES = ("iterations", "variable", "momentum", "average", "skipped")
#: State scalars beyond `iterations` (int64, replicated, after the per-variable state): role -> the
#: config flag that adds it. Only present when set, so other programs keep their convention.
EXTRA_COUNTERS = {"skipped": "skip_nonfinite"}
#: The int64 scalar counters of the state (a JAX caller without x64 may hold them as int32).
COUNTER_ROLES = ("iterations", *EXTRA_COUNTERS)
#: The optimizer's slot kinds, by role: the middle part of a slot's name.
SLOT_KINDS = {"momentum": "m", "average": "average"}


def slot_name(optimizer_name: str, role: str, variable_name: str) -> str:
    """The name of a variable's slot: "SGD/m/dense/kernel" (tf_keras: {optimizer}/{kind}/{variable})."""
    return f"{optimizer_name}/{SLOT_KINDS[role]}/{variable_name}"


class StepState(NamedTuple):
    """The optimizer's state between steps, as a JAX pytree (a NamedTuple, as optax's states).

    iterations: the scalar step counter (int64 in the program).
    momenta: one array per variable, laid out like it (tf_keras creates it even at momentum 0).
    averages: one EMA average per variable with `use_ema`, else empty.
    skipped: the scalar count of steps skipped for non-finite gradients (int64 in the program)
      with `skip_nonfinite`, else None.
    """

    iterations: Any
    momenta: tuple[Any, ...]
    averages: tuple[Any, ...] = ()
    skipped: Any = None


@dataclass(frozen=True)
class Slot:
    """One argument or result of @main."""

    role: str  # one of ROLES
    var: int | None  # index into the variable list, None for scalars
    name: str  # a readable name, e.g. "SGD/m/dense/kernel"
    shape: tuple[int, ...]
    dtype: str
    layout: Layout
    #: for a slot whose layout differs from its variable's (weight-update sharding): how it is
    #: divided and padded (`sgdgen.frontend.zero`); None where it is laid out like the variable
    plan: ShardPlan | None = None
    #: for a gradient: the mesh axes over which it arrives unreduced (a partial sum per device,
    #: as `jax.grad` of a `reduced` parameter gives); () for an ordinary (reduced) tensor
    unreduced: tuple[str, ...] = ()
    #: for a gradient that arrives in segments (a flat bucket's, as its members' gradients): which
    #: one, in offset order; None for a gradient that arrives whole
    segment: int | None = None

    @property
    def mlir_type(self) -> str:
        return tensor_type(self.shape, mlir_element_type(self.dtype))

    def sdy_text(self) -> str:
        """The slot's `#sdy.sharding`, with `unreduced={...}` for an unreduced gradient."""
        text = self.layout.sdy_text()
        if not self.unreduced:
            return text
        return text[:-1] + ", unreduced={" + ", ".join(f'"{a}"' for a in self.unreduced) + "}>"

    def to_json(self) -> dict[str, Any]:
        out = {"role": self.role, "var": self.var, "name": self.name, "shape": list(self.shape),
               "dtype": self.dtype, "layout": self.layout.sharding_specs}
        if self.unreduced:
            out["unreduced"] = list(self.unreduced)
        if self.segment is not None:
            out["segment"] = self.segment
        return out


#: A gradient's pieces: (name, shape) of each, in offset order (`StepABI.create`'s gradient_segments).
Segments = tuple[tuple[str, tuple[int, ...]], ...]


def _check_segments(variables: Sequence[VarSpec], segments: Sequence[Segments | None],
                    unreduced: Sequence[Sequence[str]], shard_update_over: str | None) -> None:
    """Segments only for a flat, replicated, reduced gradient whose pieces add up to it."""
    if len(segments) != len(variables):
        raise ValueError(f"gradient_segments gives {len(segments)} entries for {len(variables)} variables")
    for v, seg, u in zip(variables, segments, unreduced):
        if seg is None:
            continue
        size = sum(math.prod(shape) for _, shape in seg)
        if len(v.shape) != 1 or v.layout.used_axes or u or shard_update_over is not None:
            raise ConfigError(f"the gradient of {v.name!r} cannot arrive in segments: only a flat (1-D), replicated "
                              "bucket's reduced gradient can, in a step without weight-update sharding")
        if not seg or size != v.shape[0]:
            raise ConfigError(f"the gradient segments of {v.name!r} hold {size} elements in {len(seg)} pieces, but "
                              f"the variable has {v.shape[0]}; give every member's shape, in offset order")


def unreduced_for(variables: Sequence[VarSpec], axes: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Per variable, the axes of `axes` its gradient arrives unreduced over: those the variable
    is replicated over (a gradient of a variable sharded on an axis is never a partial sum over it).
    `unreduced_for(specs, ("batch",))` is the `unreduced_gradients` of a data-parallel step
    whose gradients come from `jax.grad` unreduced over "batch"."""
    return tuple(tuple(a for a in axes if a not in v.layout.used_axes) for v in variables)


@dataclass(frozen=True)
class StepABI:
    """Argument and result order of one compiled step."""

    inputs: tuple[Slot, ...]
    outputs: tuple[Slot, ...]

    @classmethod
    def for_config(cls, variables: Sequence[VarSpec], mesh: Mesh, config: Any, *, stage0: bool = False,
                   unreduced_gradients: Sequence[Sequence[str]] = (),
                   gradient_segments: Sequence[Segments | None] = ()) -> StepABI:
        """The calling convention of the step of `config` (an SGDConfig) over `variables`:
        EMA averages when `use_ema`, a learning-rate argument unless it is a schedule, the
        counters its options keep. `stage0`: the generator's global view, where every slot has
        its variable's shape and layout (`sgd-shard-weight-update` divides them later).
        `unreduced_gradients`, `gradient_segments`: see `create`."""
        return cls.create(variables, mesh, use_ema=config.use_ema, lr_input=not config.lr_is_schedule,
                          optimizer_name=config.name, unreduced_gradients=unreduced_gradients,
                          gradient_segments=gradient_segments,
                          shard_update_over=None if stage0 else getattr(config, "shard_update_over", None),
                          counters=tuple(r for r, flag in EXTRA_COUNTERS.items() if getattr(config, flag, False)))

    @classmethod
    def create(cls, variables: Sequence[VarSpec], mesh: Mesh, *, use_ema: bool, lr_input: bool,
               optimizer_name: str = "SGD", shard_update_over: str | None = None,
               counters: Sequence[str] = (), unreduced_gradients: Sequence[Sequence[str]] = (),
               gradient_segments: Sequence[Segments | None] = ()) -> StepABI:
        """The convention. `shard_update_over`: a mesh axis over which the slots of variables
        replicated over it are sharded (`sgdgen.frontend.zero`; they get their own, possibly
        padded, shape and layout). `counters`: the roles of EXTRA_COUNTERS this step keeps.
        `unreduced_gradients`: per variable, the mesh axes its gradient arrives unreduced over
        (() for all reduced; see `unreduced_for`); `sgd-insert-collectives` sums them.
        `gradient_segments`: per variable, None, or the (name, shape) of each piece its gradient
        arrives in (a flat bucket's gradient as its members' gradients, in offset order): one
        argument per piece, concatenated in the program (() for every gradient whole)."""
        unknown = sorted(set(counters) - set(EXTRA_COUNTERS))
        if unknown:
            raise ValueError(f"unknown state counters {unknown}; known: {sorted(EXTRA_COUNTERS)}")
        scalar = Layout.replicated(mesh, 0)
        if shard_update_over is not None and shard_update_over not in mesh.shape:
            raise ConfigError(f"shard_update_over={shard_update_over!r} is not an axis of the mesh {mesh} (axes "
                              f"{list(mesh.axis_names)}); name its data-parallel axis")

        def slot(role: str, i: int, v: VarSpec) -> Slot:
            name = slot_name(optimizer_name, role, v.name)
            plan = shard_plan(v.shape, v.layout.dims, mesh.shape, shard_update_over) if shard_update_over else None
            if plan is None:
                return Slot(role, i, name, v.shape, v.dtype, v.layout)
            return Slot(role, i, name, plan.slot_shape, v.dtype, Layout(plan.slot_dims, mesh), plan)

        state = [Slot("iterations", None, "iteration", (), "int64", scalar)]
        state += [Slot("variable", i, v.name, v.shape, v.dtype, v.layout) for i, v in enumerate(variables)]
        state += [slot("momentum", i, v) for i, v in enumerate(variables)]
        if use_ema:
            state += [slot("average", i, v) for i, v in enumerate(variables)]
        state += [Slot(role, None, role, (), "int64", scalar) for role in EXTRA_COUNTERS if role in counters]
        inputs = list(state)
        unreduced = tuple(tuple(u) for u in unreduced_gradients) or ((),) * len(variables)
        if len(unreduced) != len(variables):
            raise ValueError(f"unreduced_gradients gives {len(unreduced)} entries for {len(variables)} variables")
        for v, u in zip(variables, unreduced):
            bad = [a for a in u if a not in mesh.shape or a in v.layout.used_axes]
            if bad:
                raise ConfigError(f"the gradient of {v.name!r} cannot arrive unreduced over {bad}: only over mesh "
                                  f"axes its variable is replicated on (it is laid out {v.layout.sharding_specs} on "
                                  f"{mesh}); reduce it over those axes first")
        segments = tuple(gradient_segments) or (None,) * len(variables)
        _check_segments(variables, segments, unreduced, shard_update_over)
        for (i, v), u, seg in zip(enumerate(variables), unreduced, segments):
            if seg is None:
                inputs.append(Slot("gradient", i, f"gradient/{v.name}", v.shape, v.dtype, v.layout, unreduced=u))
            else:
                inputs += [Slot("gradient", i, f"gradient/{name}", tuple(shape), v.dtype,
                                Layout.replicated(mesh, len(shape)), segment=j)
                           for j, (name, shape) in enumerate(seg)]
        if lr_input:
            inputs.append(Slot("learning_rate", None, "learning_rate", (), "float32", scalar))
        return cls(tuple(inputs), tuple(state))

    @cached_property
    def shard_update_over(self) -> str | None:
        """The axis the weight update is sharded over (some slot is divided over it), else None."""
        return next((s.plan.axis for s in self.outputs if s.plan is not None), None)

    def slot(self, role: str, var: int) -> Slot:
        """The state slot (argument) of `role` ("momentum" / "average") for variable `var`."""
        return self.inputs[self.index(role, var)]

    @cached_property
    def unreduced_gradients(self) -> tuple[tuple[str, ...], ...]:
        """Per variable, the axes its gradient arrives unreduced over; () when every gradient is reduced."""
        found = tuple(s.unreduced for s in self.inputs if s.role == "gradient" and not s.segment)
        return found if any(found) else ()

    @cached_property
    def gradient_segments(self) -> tuple[int | None, ...]:
        """Per variable, how many pieces its gradient arrives in (None: whole); () when all whole."""
        counts: dict[int, int] = {}
        for s in self.inputs:
            if s.role == "gradient" and s.segment is not None:
                counts[s.var] = counts.get(s.var, 0) + 1
        return tuple(counts.get(i) for i in range(self.num_variables)) if counts else ()

    @cached_property
    def num_variables(self) -> int:
        return sum(1 for s in self.inputs if s.role == "variable")

    @cached_property
    def use_ema(self) -> bool:
        return any(s.role == "average" for s in self.inputs)

    @cached_property
    def skip_nonfinite(self) -> bool:
        """Whether the step skips non-finite gradients (it keeps a `skipped` counter)."""
        return any(s.role == "skipped" for s in self.inputs)

    @cached_property
    def lr_input(self) -> bool:
        """Whether the learning rate is a runtime argument (the last one)."""
        return bool(self.inputs) and self.inputs[-1].role == "learning_rate"

    @cached_property
    def gradient_positions(self) -> frozenset[int]:
        """Indices of the gradient arguments."""
        return frozenset(k for k, s in enumerate(self.inputs) if s.role == "gradient")

    @cached_property
    def donated(self) -> tuple[int, ...]:
        """Indices of the arguments whose buffers the step takes over (the state)."""
        return tuple(k for k, s in enumerate(self.inputs) if s.role in STATE_ROLES)

    def pack(self, state: StepState, params: Sequence[Any], grads: Sequence[Any], lr: Any = None) -> list[Any]:
        """The step's arguments, in order, from a state, the variables, their gradients and the rate.

        The one place that knows the order; `unpack` is its inverse for the results.
        """
        n = self.num_variables
        parts = {"variables": params, "momenta": state.momenta, "gradients": grads}
        if self.use_ema:
            parts["averages"] = state.averages
        for what, seq in parts.items():
            if len(seq) != n:
                raise ValueError(f"the step updates {n} variables, but {len(seq)} {what} were given")
        if not self.use_ema and len(state.averages):
            raise ValueError("this step keeps no EMA averages (use_ema=False), but the state holds "
                             f"{len(state.averages)}")
        if self.skip_nonfinite and state.skipped is None:
            raise ValueError("this step counts skipped steps (skip_nonfinite=True), but state.skipped is None; "
                             "build the state with the step's init")
        if not self.skip_nonfinite and state.skipped is not None:
            raise ValueError("this step keeps no skipped-step counter (skip_nonfinite=False), but state.skipped "
                             "is set; build the state with the step's init")
        args = [state.iterations, *params, *state.momenta]
        if self.use_ema:
            args += state.averages
        if self.skip_nonfinite:
            args.append(state.skipped)
        segments = self.gradient_segments
        if segments:  # a segmented gradient is given as the sequence of its pieces
            for i, (g, k) in enumerate(zip(grads, segments)):
                if k is not None and len(g) != k:
                    raise ValueError(f"the gradient of variable {i} arrives in {k} pieces, but {len(g)} were given")
            args += [x for g, k in zip(grads, segments) for x in (g if k is not None else (g,))]
        else:
            args += grads
        if self.lr_input:
            if lr is None:
                raise ValueError("this step takes the learning rate as an argument; pass lr")
            args.append(lr)
        elif lr is not None:
            raise ValueError("this step computes its learning rate from a schedule; do not pass lr")
        return args

    def unpack(self, results: Sequence[Any]) -> tuple[tuple[Any, ...], StepState]:
        """(new variables, new state) from the step's results (in `outputs` order)."""
        n = self.num_variables
        if len(results) != len(self.outputs):
            raise ValueError(f"the step returns {len(self.outputs)} results, got {len(results)}")
        params = tuple(results[1:1 + n])
        momenta = tuple(results[1 + n:1 + 2 * n])
        averages = tuple(results[1 + 2 * n:1 + 3 * n]) if self.use_ema else ()
        skipped = results[self.index("skipped", outputs=True)] if self.skip_nonfinite else None
        return params, StepState(results[0], momenta, averages, skipped)

    @cached_property
    def aliases(self) -> dict[int, int]:
        """result index -> argument index it updates in place."""
        return {k: k for k in range(len(self.outputs))}

    @cached_property
    def _positions(self) -> tuple[dict[tuple[str, int | None], int], dict[tuple[str, int | None], int]]:
        """(role, variable) -> position, for the arguments and for the results."""
        inputs: dict[tuple[str, int | None], int] = {}
        for k, s in enumerate(self.inputs):
            inputs.setdefault((s.role, s.var), k)  # a segmented gradient: its first piece
        return inputs, {(s.role, s.var): k for k, s in enumerate(self.outputs)}

    def index(self, role: str, var: int | None = None, *, outputs: bool = False) -> int:
        """Position of the slot with this role (and variable index)."""
        k = self._positions[bool(outputs)].get((role, var))
        if k is None:
            raise KeyError(f"no {'result' if outputs else 'argument'} with role {role!r} for variable {var}")
        return k

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs],
                "aliases": {str(k): v for k, v in self.aliases.items()}}
