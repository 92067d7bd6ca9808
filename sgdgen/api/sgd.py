"""`sgdgen.SGD`: the Keras DTensor SGD API over one compiled, partitioned step.

    opt = sgdgen.SGD(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                     global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=100, mesh=mesh)
    opt.apply_gradients(zip(grads, variables))   # one compiled step for all variables

Semantics are tf_keras 2.21's non-mesh path (SEMANTICS.md): SGD with momentum
`m = -g*lr + m*momentum; w += m` (Nesterov: `w += -g*lr + m*momentum`), decoupled weight
decay before the update, clipnorm / global_clipnorm / clipvalue, EMA of the weights with
periodic overwrite, schedules evaluated inside the program from `iterations`.

Every argument is checked before anything runs; a call that raises changes nothing.
Variables and slots are updated in place: their buffers are donated to the step.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sgdgen import backend
from sgdgen.api.flat import ROLES, Buckets, assign_all
from sgdgen.api.variable import FlatBuffer, Variable, substituted
from sgdgen.codegen.abi import Slot, StepABI, StepState, slot_name
from sgdgen.dtypes import COUNTER_ELEMENT_TYPES
from sgdgen.frontend.zero import pad
from sgdgen.errors import ArtifactError, StepInputError, StepTypeError, UnknownVariableError
from sgdgen.frontend import buckets as bucketing
from sgdgen.frontend import schedules
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.schedules import LearningRateSchedule
from sgdgen.frontend.spec import Layout, Mesh, SpecError, VarSpec, canonical_dtype, numpy_dtype
from sgdgen.runtime import gcpause
from sgdgen.runtime.core import Step, uninterruptible
from sgdgen.runtime.executable import ShardingMatcher
from sgdgen.runtime.program import StepProgram

_NOT_SETTABLE = ("This optimizer was created with a `LearningRateSchedule` object as its `learning_rate` "
                 "constructor argument, hence its learning rate is not settable. If you need the learning rate "
                 "to be settable, you should instantiate the optimizer with a float `learning_rate` argument.")


_NOT_BUILT = ("You are calling `set_weights()` on an optimizer that has not yet been built. Please call "
              "`optimizer.build(trainable_variables)` to create the optimizer weights before calling `set_weights()`.")
_COUNTER_DTYPES = tuple(np.dtype(n) for n in COUNTER_ELEMENT_TYPES)  # int32 or int64 `iterations`


def _unique_names(names: Sequence[str]) -> list[str]:
    """The names, with each repeat given the first free `{name}_{k}` suffix (k = 1, 2, ...):
    unique and a function of the list alone, so the program, its cache key and artifacts
    stay deterministic while any number of variables share a name (tf_keras keys
    variables by identity; a name only labels them)."""
    taken, seen, out = set(names), set(), []
    for n in names:
        if n in seen:
            k = 1
            while f"{n}_{k}" in taken:
                k += 1
            n = f"{n}_{k}"
            taken.add(n)
        seen.add(n)
        out.append(n)
    return out


def _program_config(config: SGDConfig) -> SGDConfig:
    """The config the program is built for: a float learning rate, or a custom schedule
    evaluated on the host, is a runtime argument (0.0 in the program's signature); a
    built-in schedule is computed in the program."""
    if config.lr_is_schedule and schedules.is_compiled(config.learning_rate):
        return config
    return dataclasses.replace(config, learning_rate=0.0)


class _VariableList(list):
    """`opt.variables` works as a property and, as in the seed, as a call: `opt.variables()`."""

    def __call__(self) -> list[Any]:
        return list(self)


class SGD:
    """Gradient descent (with momentum) optimizer, compiled ahead of time for a device mesh.

    Update rule for parameter `w` with gradient `g`, momentum slot `m`:

        m = -learning_rate * g + momentum * m
        w = w + m                                   (nesterov: w = w - learning_rate * g + momentum * m)

    preceded by clipping and `w -= w * weight_decay * learning_rate`, followed by the EMA
    `avg = ema_momentum * avg + (1 - ema_momentum) * w` and, every `ema_overwrite_frequency`
    steps, `w = avg`. Variables laid out on `mesh` keep their layout; slots take it too.

    Args:
      learning_rate: float, a `sgdgen.frontend.schedules` schedule (computed in the program), or a
        zero-argument callable (called once, at construction, as tf_keras does). Default 0.01.
      momentum: float in [0, 1].
      nesterov: Nesterov momentum.
      amsgrad: accepted for the seed's signature; it has no effect.
      gradients_clip_option: `GradientsClipOption(clipnorm, clipvalue, global_clipnorm)`.
      ema_option: `EMAOption(use_ema, ema_momentum, ema_overwrite_frequency=100)`.
      jit_compile: accepted and reported; the step is always compiled.
      name: prefix of slot names ("SGD/m/dense/kernel").
      mesh: a `Mesh`, "batch=2,model=4", a dict or a `jax.sharding.Mesh`; default: the
        variables' mesh.
      weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
      ema_overwrite_frequency: the modern flat arguments (keyword only).
      skip_nonfinite: keyword only, default False (tf_keras: NaN/Inf propagate). True skips
        every step whose gradients hold a NaN or an Inf, decided inside the program: nothing
        changes but `skipped_steps` (`iterations` too stays; docs/numerics.md §2a).
      buckets: keyword only, default False. True keeps the small replicated variables' values,
        momenta and averages in a few flat buffers (README "Flat buckets"): the step takes a
        handful of arguments; each such variable (and its slots) becomes a view of its bucket.
        Every variable of a flat bucket then needs a gradient at every step.
      bucket_threshold: with buckets, variables of at least this many elements keep their own
        buffers (default 65,536).

    Note: Keras 3 calls a callable learning rate at every read; tf_keras, and sgdgen, once.
    """

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 amsgrad: bool = False, gradients_clip_option: Any = None, ema_option: Any = None,
                 jit_compile: bool = False, name: str = "SGD", mesh: Any = None, **kwargs: Any):
        self._config = SGDConfig.create(learning_rate, momentum, nesterov, amsgrad, gradients_clip_option,
                                        ema_option, jit_compile, name, **kwargs)
        self._mesh = Mesh.of(mesh) if mesh is not None else None
        self._iterations = Variable(np.int64(0), name="iteration", mesh=self._mesh, dtype=np.int64)
        self._skipped = Variable(np.int64(0), name="skipped_steps", mesh=self._mesh, dtype=np.int64)
        self._check_schedule(self._config.learning_rate)
        self._name_scope: str | None = None  # set by apply_gradients while it builds (tf_keras' name_scope)
        self._constraints: dict[tuple[Any, Any], Any] = {}  # (constraint, sharding) -> jitted function
        self._built = False
        self._stepped = False  # whether apply_gradients has returned once (the first call pauses the GC)
        self._index: dict[int, int] = {}
        self._tracked: list[Variable] = []
        self._momenta: list[Variable] = []
        self._averages: list[Variable] = []
        self._extra: list[Variable] = []
        self._exclude_ids: set[int] = set()
        self._exclude_names: list[str] = []
        self._steps: dict[tuple[Any, ...], Step] = {}  # per (variable set, config signature): no per-step rebuild
        self._equivalent = ShardingMatcher()
        self._signature: tuple[SGDConfig, SGDConfig] | None = None  # (config, its program config), last used
        self._decay: dict[int, bool] = {}  # weight decay per variable, fixed once built
        self._flat: Buckets | None = None  # with buckets=True, once built: the flat buckets (sgdgen.api.flat)
        self._last_flat_grads: dict[int, Any] | None = None  # compute_gradients' flat gradients, for minimize
        self._grad_specs: dict[int, tuple[Any, Any, Any]] = {}  # per variable: a gradient (shape, dtype, sharding) checked
        self._last_call: _RepeatedCall | None = None  # the last step's resolution, for a loop repeating it
        self._lock = threading.RLock()  # one step (or state change) at a time per optimizer (issue 16.6)

    # ---- configuration -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> SGDConfig:
        """The validated hyperparameters (frozen); `get_config()` is its Keras dict."""
        return self._config

    def __getattr__(self, item: str) -> Any:
        # momentum, nesterov, weight_decay, clipnorm, ... read through to the config.
        if item.startswith("_") or item not in SGDConfig.__dataclass_fields__:
            raise AttributeError(item)
        return getattr(self._config, item)

    @property
    def mesh(self) -> Mesh:
        return self._mesh if self._mesh is not None else self._iterations.mesh

    def _step_count(self) -> Any:
        """The current `iterations` as a NumPy scalar of the counter's dtype (what a schedule gets)."""
        return self._iterations.numpy()[()]

    def _check_schedule(self, lr: Any) -> None:
        """A custom schedule is evaluated once now, as tf_keras' `_build_learning_rate` does,
        so that one that cannot give a float fails here rather than at the first step."""
        if isinstance(lr, LearningRateSchedule) and not schedules.is_compiled(lr):
            schedules.evaluate(lr, self._step_count())

    @property
    def learning_rate(self) -> np.float32:
        """The learning rate of the next step (a schedule's value at the current `iterations`)."""
        lr = self._config.learning_rate
        if isinstance(lr, LearningRateSchedule):
            return schedules.evaluate(lr, self._step_count())
        return np.float32(lr)

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        """A float (or callable) replaces a float rate; a schedule replaces any rate, and the
        optimizer follows it from the next step (a built-in schedule is part of the program,
        so the next step compiles once). As in tf_keras, a float cannot replace a schedule."""
        if isinstance(value, LearningRateSchedule):
            self._check_schedule(value)
            self._config = dataclasses.replace(self._config, learning_rate=value)
            return
        if self._config.lr_is_schedule:
            raise TypeError(_NOT_SETTABLE)
        new = SGDConfig.create(learning_rate=value).learning_rate  # same conversion rules as the constructor
        self._config = dataclasses.replace(self._config, learning_rate=new)

    lr = learning_rate

    @property
    def iterations(self) -> Variable:
        """The step counter (replicated, int64 unless an int32 one was set); the first entry of
        `variables`. An int32 counter is widened to int64 for the step and narrowed back after
        it, so it wraps to -2**31 after 2**31 - 1 steps, as TF's int32 `assign_add` does."""
        return self._iterations

    @property
    def skipped_steps(self) -> Variable:
        """How many steps `skip_nonfinite=True` skipped because a gradient held a NaN or an Inf
        (replicated int64, saturating at 2**63 - 1); stays 0 without skip_nonfinite. Not one of
        `variables` (tf_keras' weight list is unchanged)."""
        return self._skipped

    @iterations.setter
    def iterations(self, variable: Any) -> None:
        if self._built:
            raise RuntimeError("Cannot set `iterations` to a new Variable after the Optimizer weights have been "
                               "created. Here it is attempting to set `iterations` to a new Variable.")
        if not isinstance(variable, Variable) or variable.dtype not in _COUNTER_DTYPES or variable.shape != ():
            got = f"{variable.dtype} of shape {list(variable.shape)}" if isinstance(variable, Variable) else repr(variable)
            raise TypeError("`iterations` must be a scalar int64 or int32 sgdgen.Variable, e.g. "
                            f"sgdgen.Variable(np.int64(10), dtype=np.int64, name='iteration'); got {got}")
        self._iterations = variable

    def get_config(self) -> dict[str, Any]:
        """Keras' keys and order (SEMANTICS §8); JSON-serialisable."""
        return self._config.get_config()

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None, *,
                    mesh: Any = None) -> SGD:
        """Creates an optimizer from `get_config()` output (a tf_keras SGD config reads too).
        `custom_objects` maps a custom schedule's class name to its class, as in Keras."""
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"], custom_objects)
        cfg = SGDConfig.from_config(config)
        kw = {k: v for k, v in cfg.get_config().items() if k != "is_legacy_optimizer"}
        kw["learning_rate"] = cfg.learning_rate
        return cls(**kw, mesh=mesh)

    # ---- state -------------------------------------------------------------------------
    @property
    def variables(self) -> _VariableList:
        """[iteration, {name}/average/..., {name}/m/..., added variables] (SEMANTICS §3)."""
        return _VariableList([self._iterations, *self._averages, *self._momenta, *self._extra])

    def add_variable(self, shape: Sequence[int] = (), dtype: Any = None, initializer: Any = "zeros",
                     name: str | None = None) -> Variable:
        """Creates an optimizer variable, replicated on the optimizer's mesh."""
        dt = numpy_dtype(canonical_dtype(dtype or "float32", what=f"optimizer variable {name!r}"))
        shape = tuple(int(n) for n in shape)
        if callable(initializer):
            init = np.asarray(initializer(shape, dt), dtype=dt)
        elif initializer in ("zeros", "ones"):
            init = (np.zeros if initializer == "zeros" else np.ones)(shape, dt)
        else:
            raise ValueError(f"initializer must be 'zeros', 'ones' or a callable (shape, dtype); got {initializer!r}")
        var = Variable(init, name=name, layout=Layout.replicated(self.mesh, len(shape)))
        self._extra.append(var)
        return var

    def add_variable_from_reference(self, model_variable: Variable, variable_name: str,
                                    shape: Sequence[int] | None = None, initial_value: Any = None) -> Variable:
        """An optimizer variable made from a model variable, added to `variables` (tf_keras'
        method): its dtype, `shape` (default: the variable's), zeros or `initial_value`, named
        "{variable_name}/{var}" ("{scope}/..." inside `apply_gradients(name=scope)`). It takes
        the variable's layout when it has its shape, else it is replicated."""
        var = self._slot(model_variable, variable_name, self._name_scope, shape, initial_value)
        self._extra.append(var)
        return var

    @staticmethod
    def _slot_name(model_variable: Variable, variable_name: str, scope: str | None) -> str:
        role = {"m": "momentum", "average": "average"}.get(variable_name)
        if scope and role:
            return slot_name(scope, role, model_variable._shared_name)
        return f"{scope + '/' if scope else ''}{variable_name}/{model_variable._shared_name}"

    def _slot(self, model_variable: Variable, variable_name: str, scope: str | None,
              shape: Sequence[int] | None = None, initial_value: Any = None, slot: Slot | None = None) -> Variable:
        name = self._slot_name(model_variable, variable_name, scope)
        dt = model_variable.dtype
        shape = model_variable.shape if shape is None else tuple(int(n) for n in shape)
        if initial_value is None:
            init = np.zeros(shape, dt)
        else:
            init = initial_value.value if isinstance(initial_value, Variable) else initial_value
            if tuple(np.shape(init)) != shape:
                raise ValueError(f"add_variable_from_reference({model_variable.name!r}, {variable_name!r}): "
                                 f"initial_value has shape {list(np.shape(init))}, expected {list(shape)}")
        layout = (model_variable.layout if shape == model_variable.shape
                  else Layout.replicated(model_variable.mesh, len(shape)))
        if slot is not None and slot.plan is not None:  # weight-update sharding: the ABI's own slot layout
            var = Variable(pad(slot.plan, np.asarray(init, dt)), name=name, layout=slot.layout, dtype=dt)
            var._plan = slot.plan
            return var
        return Variable(init, name=name, layout=layout, dtype=dt)

    def exclude_from_weight_decay(self, var_list: Iterable[Variable] | None = None,
                                  var_names: Iterable[str] | None = None) -> None:
        """Variables (by object, or by `re.search` of a pattern in `var.name`, which ends in ':0')
        that weight decay skips. Must be called before `build`; each call replaces both lists."""
        if self._built:
            raise ValueError("`exclude_from_weight_decay()` can only be configued before the optimizer is built.")
        self._exclude_ids = {v._unique_id for v in (var_list or [])}
        self._exclude_names = list(var_names or [])

    def _use_weight_decay(self, var: Variable) -> bool:
        if self._built:  # the exclusions are fixed from build on: one regex search per variable, not per step
            flag = self._decay.get(var._unique_id)
            if flag is None:
                flag = self._decay[var._unique_id] = self._decays(var)
            return flag
        return self._decays(var)

    def _decays(self, var: Variable) -> bool:
        if var._unique_id in self._exclude_ids:
            return False
        return not any(re.search(p, var.name) for p in self._exclude_names)

    def build(self, var_list: Sequence[Variable]) -> None:
        """Creates the slots: a momentum per variable (always), an EMA average (a copy of the
        variable) with use_ema; moves `iterations` to the variables' mesh. Runs once."""
        self._build(var_list)

    def _build(self, var_list: Sequence[Variable], prepared: tuple[Mesh, tuple[VarSpec, ...],
               bucketing.BucketPlan | None] | None = None) -> None:
        """`build`; `prepared`: the variables' (checked mesh, specs, bucket plan) when the caller
        (`load_artifact`) has made them for these variables and this optimizer's exclusions."""
        if self._built:
            return
        var_list = list(var_list)
        mesh = self._common_mesh(var_list) if prepared is None else prepared[0]
        if self._iterations.mesh != mesh:
            it = self._iterations
            self._iterations = Variable(it.numpy(), name=it._shared_name, layout=Layout.replicated(mesh, 0),
                                        dtype=it.dtype)
        if self._skipped.mesh != mesh:
            sk = self._skipped
            self._skipped = Variable(sk.numpy(), name=sk._shared_name, layout=Layout.replicated(mesh, 0),
                                     dtype=sk.dtype)
        for k, v in enumerate(var_list):
            self._index[v._unique_id] = k
        self._tracked = var_list
        scope = self._name_scope or self.name  # tf_keras: the scope apply_gradients opens (a direct build: ours)
        # the slots' own layouts (weight-update sharding) come from the calling convention
        if prepared is None:
            specs = self._specs(var_list, self._decay_flags(var_list))
            plan = self._bucket_plan(specs, mesh)
        else:
            specs, plan = prepared[1], prepared[2]
        abi = StepABI.for_config(plan.buckets if plan is not None else specs, mesh, self._config)
        if plan is not None:
            self._flat = Buckets.create(plan, abi, var_list)
        bucket = (lambda i: plan.members[i].bucket) if plan is not None else (lambda i: i)

        def slot(i: int, v: Variable, role: str, **kw: Any) -> Variable:
            name = {"momentum": "m"}.get(role, role)
            if self._flat is not None and self._flat.flat(bucket(i)):
                return self._flat.slot_view(i, role, self._slot_name(v, name, scope))
            return self._slot(v, name, scope, slot=abi.slot(role, bucket(i)), **kw)

        if self._config.use_ema:
            self._averages = [slot(i, v, "average", initial_value=v) for i, v in enumerate(var_list)]
        self._momenta = [slot(i, v, "momentum") for i, v in enumerate(var_list)]
        self._built = True

    def _bucket_plan(self, specs: Sequence[VarSpec], mesh: Mesh) -> bucketing.BucketPlan | None:
        """With `buckets=True`, the flat buckets of these variables (None otherwise, or when the
        plan buckets nothing: then the optimizer is exactly the unbucketed one)."""
        if not self._config.buckets:
            return None
        plan = bucketing.plan(specs, mesh, threshold=self._config.bucket_threshold,
                              per_variable_norms=self._config.clipnorm is not None)
        return None if plan.trivial else plan

    def _checked_mesh(self, variables: Sequence[Variable]) -> Mesh:
        """`_common_mesh`, skipped when every variable is one this built optimizer tracks (their
        dtype and mesh were checked at build and a Variable keeps both): no per-variable checks
        on the per-step path beyond a dict lookup."""
        index = self._index
        if self._built and all(type(v) is Variable and v._unique_id in index for v in variables):
            return self.mesh
        return self._common_mesh(variables)

    def _common_mesh(self, var_list: Sequence[Variable]) -> Mesh:
        dtypes: set[np.dtype] = set()
        for v in var_list:
            if not isinstance(v, Variable):
                raise TypeError(_not_a_variable(v))
            dt = v.dtype
            if dt not in dtypes:  # once per dtype: integer variables are refused here, naming the first
                canonical_dtype(dt, what=f"variable {v.name!r}")
                dtypes.add(dt)
        mesh = self._mesh if self._mesh is not None else (var_list[0].mesh if var_list else Mesh(()))
        for v in var_list:
            if v.mesh != mesh:
                raise SpecError(f"variable {v.name!r} is laid out on mesh {v.mesh}, but the optimizer's mesh is "
                                f"{mesh}; create its Layout on the optimizer's mesh")
        return mesh

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets `variables` (same order) from arrays. Every array is checked and converted
        first (shape, a dtype that casts to the variable's, a finite integer for `iterations`),
        then all are written: a call that raises changes nothing."""
        with self._lock:
            if not self._built:
                raise ValueError(_NOT_BUILT)
            current = self.variables
            if len(weights) != len(current):
                raise ValueError(f"set_weights expects {len(current)} arrays (the order of `variables`: "
                                 f"{[v.name for v in current]}), got {len(weights)}")
            hosts = [_weight_value(v, w, counter=v is self._iterations) for v, w in zip(current, weights)]
            # transfers before any write; views of a flat bucket are written with one transfer per bucket
            placed = [h if v._view is not None else v._place(h, v.dtype) for v, h in zip(current, hosts)]
            assign_all(current, placed)

    def get_weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.variables]

    def finalize_variable_values(self, var_list: Sequence[Variable]) -> None:
        """With use_ema, copies each variable's moving average into it (`model.fit` does this at the end).
        Every variable is looked up first: an unknown one raises before any is changed."""
        if not self._config.use_ema:
            return
        with self._lock:
            var_list = list(var_list)
            averages = [self._averages[self._slot_index(v)] for v in var_list]
            placed = [a.numpy() if v._view is not None else v._place(np.array(a.value), v.dtype)
                      for v, a in zip(var_list, averages)]
            assign_all(var_list, placed)

    def _slot_index(self, v: Variable) -> int:
        k = self._index.get(getattr(v, "_unique_id", None))
        if k is None:
            raise UnknownVariableError(
                f"The optimizer cannot recognize variable {getattr(v, 'name', v)}: its slots were built for "
                f"{[t.name for t in self._tracked]}. An sgdgen.SGD is built once, for every variable it will update: "
                "call `optimizer.build(variables)` (or `SGD.load_artifact(path, variables)`) with the full list of "
                "trainable variables before the training loop, or use one optimizer per group of variables.")
        return k

    # ---- the step ----------------------------------------------------------------------
    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Variable]], name: str | None = None,
                        skip_gradients_aggregation: bool = False, **kwargs: Any) -> Variable:
        """Applies one step to every variable with a gradient, as ONE compiled program.

        A `None` gradient skips its variable entirely (no decay, update or EMA), with a
        warning; all-None raises. Returns `iterations`.
        """
        with self._lock:
            if self._stepped:
                return self._apply_gradients(list(grads_and_vars), name)
            with gcpause.paused():  # the first step builds every slot and its helpers (sgdgen.runtime.gcpause)
                out = self._apply_gradients(list(grads_and_vars), name)
            self._stepped = True
            return out

    def _apply_gradients(self, pairs: list[tuple[Any, Variable]], name: str | None, *,
                         flat_grads: dict[int, Any] | None = None) -> Variable:
        call = self._last_call if flat_grads is None else None
        grads = call.gradients(pairs, self._state_objects()) if call is not None else None
        if grads is not None:  # the last call's variables, with gradients like its own (a training loop)
            lr = self._lr_value(self._config)
            if call.constrained:
                self._check_constraints(call.variables)
            call.run(grads, lr)
            if call.constrained:
                self._apply_constraints(call.variables)
            return self._iterations
        _refuse_tracers(pairs)
        if not pairs:
            return self._iterations
        for k, pair in enumerate(pairs):
            if isinstance(pair, tuple) and len(pair) == 2 and _is_variable(pair[0]) and not _is_variable(pair[1]):
                raise TypeError(f"grads_and_vars[{k}] is ({type(pair[0]).__name__} {getattr(pair[0], 'name', '')!r}, "
                                f"{type(pair[1]).__name__}): the pairs are (gradient, variable); swap them, e.g. "
                                "zip(grads, variables)")
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        if all(g is None for g in grads):
            raise ValueError(f"No gradients provided for any variable: ({[getattr(v, 'name', v) for v in variables]},"
                             f"). Provided `grads_and_vars` is {tuple(pairs)}.")
        mesh = self._checked_mesh(variables)
        seen: dict[int, str] = {}
        for v in variables:
            if v._unique_id in seen:
                raise ValueError(f"variable {v.name!r} appears twice in grads_and_vars; give each variable once")
            seen[v._unique_id] = v.name
        present = [(g, v) for g, v in pairs if g is not None] if any(g is None for g in grads) else pairs
        placed = [self._place_gradient(g, v) for g, v in present]  # checks before any state changes
        stepped = [v for _, v in present]
        decay = self._decay_flags(stepped)
        if self._built:
            for v in stepped:
                self._slot_index(v)
            plan = self._flat.plan if self._flat is not None else None
            build = self._tracked
        else:
            build = variables
            plan = self._bucket_plan(self._specs(variables, self._decay_flags(variables)), mesh)
        if plan is not None:
            self._refuse_partial_buckets(plan, build, {v._unique_id for v in stepped})
        if not self._built:  # the generator's checks run now, before build creates anything (text kept for the compile)
            step = (self._bucket_step(plan, self._present_buckets(plan, stepped, variables), self._config, mesh)
                    if plan is not None else self._step(stepped, self._config, decay, mesh))
            _ = step.program.stage0_text
        self._check_constraints(stepped)
        lr = self._lr_value(self._config)  # a custom schedule is evaluated here: a failure changes nothing
        missing = [v.name for g, v in pairs if g is None]
        if missing:
            warnings.warn(f"Gradients do not exist for variables {missing} when minimizing the loss. If you're "
                          "using `model.compile()`, did you forget to provide a `loss` argument?", stacklevel=2)
        self._name_scope = name or self.name  # tf_keras builds inside name_scope(name or self.name)
        try:
            self.build(variables)
        finally:
            self._name_scope = None
        run = self._bucket_call(stepped, self._config) if self._flat is not None else \
            self._call(stepped, self._config, decay)
        run(placed, lr, flat_grads) if flat_grads is not None else run(placed, lr)
        if flat_grads is None and len(stepped) == len(pairs):
            self._remember_call(pairs, placed, run)
        self._apply_constraints(stepped)
        return self._iterations

    def _state_objects(self) -> tuple[Any, ...]:
        """What a remembered call was resolved against: the config, the buckets, the slot lists
        and the counters (by identity; any of them replaced, the call is resolved again)."""
        return (self._config, self._flat, self._momenta, self._averages, self._iterations, self._skipped)

    def _remember_call(self, pairs: Sequence[tuple[Any, Variable]], placed: Sequence[Any], run: Any) -> None:
        """Keeps this step's resolution for the next call with the same variables, when every
        gradient was a jax.Array taken as it is (see `_RepeatedCall`)."""
        import jax

        if all(p is g and isinstance(g, jax.Array) for p, (g, _) in zip(placed, pairs)):
            self._last_call = _RepeatedCall.of(pairs, self._state_objects(), run)
        else:
            self._last_call = None

    @staticmethod
    def _refuse_partial_buckets(plan: bucketing.BucketPlan, variables: Sequence[Variable], stepped: set[int]) -> None:
        """A flat bucket is stepped whole: a member without a gradient is an error (raised before any
        change). `variables`: the plan's, in its order; `stepped`: the ids of those with a gradient."""
        for k, v in enumerate(variables):
            if v._unique_id not in stepped and not plan.members[k].own:
                raise StepInputError(
                    f"variable {v.name!r} has no gradient, but it shares a flat bucket with other variables "
                    "(SGD(buckets=True)), which is stepped whole: pass a gradient for it (a zero gradient still "
                    "applies weight decay, momentum and the EMA to it), or create the optimizer with buckets=False "
                    "to skip variables without gradients")

    @staticmethod
    def _present_buckets(plan: bucketing.BucketPlan, stepped: Sequence[Variable],
                         variables: Sequence[Variable]) -> tuple[int, ...]:
        """The buckets a step updates: every flat one, and each own buffer whose variable is stepped."""
        ids = {v._unique_id for v in stepped}
        return tuple(b for b, ks in enumerate(plan.contents)
                     if not plan.members[ks[0]].own or variables[ks[0]]._unique_id in ids)

    def _bucket_step(self, plan: bucketing.BucketPlan, present: tuple[int, ...], config: SGDConfig,
                     mesh: Mesh | None = None) -> Step:
        """The functional step over these buckets of `plan` (built once per set and config signature)."""
        if self._signature is None or self._signature[0] is not config:
            self._signature = (config, _program_config(config))
        signature = self._signature[1]
        key = ("buckets", present, signature)
        step = self._steps.get(key)
        if step is None:
            specs = tuple(plan.buckets[b] for b in present)
            step = self._steps[key] = Step(StepProgram(signature, specs, mesh if mesh is not None else self.mesh))
        return step

    def _segment_step(self, plan: bucketing.BucketPlan, present: tuple[int, ...], step: Step) -> Step | None:
        """`step` (over these buckets) taking each flat bucket's gradient as its members'
        gradients (`StepABI` gradient segments), where its kernels read them in place: CPU devices
        with sgdgen's kernels, no weight-update sharding; else None (the gradients are packed)."""
        from sgdgen.runtime import cpu_kernels

        if (step.abi.shard_update_over is not None or not cpu_kernels.available()
                or not backend.on_cpu(backend.devices_for(step.program.mesh.device_ids))):
            return None
        key = ("segments", present, step.program.config)
        seg = self._steps.get(key)
        if seg is None:
            segments = plan.gradient_segments(present)
            seg = self._steps[key] = Step(dataclasses.replace(step.program, gradient_segments=segments))
        return seg

    def _bucket_call(self, variables: Sequence[Variable], config: SGDConfig) -> Callable[..., None]:
        """One step over the flat buckets (and the own buffers of `variables`), resolved once
        (buckets, step, owners, which gradient goes where): `run(grads, lr, flat_grads=None)` feeds
        the per-variable `grads` to the step that takes them as segments (`_segment_step`) or packs
        them per flat bucket (`Buckets.gradients` decides), or takes them flat (bucket -> array, from
        `minimize`), runs the step and binds its results to the buffers (views invalidated); it
        costs O(buckets) beyond the gradients' arguments."""
        flat = self._flat
        plan = flat.plan
        present = self._present_buckets(plan, variables, self._tracked)
        step = self._bucket_step(plan, present, config)
        segmented = self._segment_step(plan, present, step)  # None where packing is the way
        position = {v._unique_id: i for i, v in enumerate(variables)}
        packed_buckets = [b for b in present if flat.flat(b)]
        members = [[position[self._tracked[k]._unique_id] for k in plan.contents[b]] for b in packed_buckets]
        sources: list[tuple[int, int | None]] = []  # per present bucket: (bucket, None) flat, (-1, i) grads[i]
        owners: dict[str, list[Any]] = {r: [] for r in ROLES}
        for b in present:
            if flat.flat(b):
                bufs = flat.buffers[b]
                for r in owners:
                    if r in bufs:
                        owners[r].append(bufs[r])
                sources.append((b, None))
            else:
                k = plan.contents[b][0]
                owners["variable"].append(self._tracked[k])
                owners["momentum"].append(self._momenta[k])
                if config.use_ema:
                    owners["average"].append(self._averages[k])
                sources.append((-1, position[self._tracked[k]._unique_id]))
        it = self._iterations
        narrow = it.dtype != np.int64
        skipped = self._skipped if config.skip_nonfinite else None
        targets = [it, *owners["variable"], *owners["momentum"], *owners["average"],
                   *([skipped] if skipped is not None else [])]
        value = lambda o: o.array if isinstance(o, FlatBuffer) else o.value  # noqa: E731

        def run(grads: Sequence[Any], lr: np.float32 | None, flat_grads: dict[int, Any] | None = None) -> None:
            with self._lock:
                chosen = step
                if flat_grads is None:
                    as_segments, fed = flat.gradients(packed_buckets, [[grads[i] for i in ks] for ks in members],
                                                      segmented)
                    chosen = segmented if as_segments else step
                    flat_grads = dict(zip(packed_buckets, fed))
                else:  # from jax.grad over the buckets: laid out as the buckets are (a no-op put)
                    flat_grads = {b: backend.device_put(x, step.abi.slot("variable", present.index(b)).layout
                                                        .named_sharding()) for b, x in flat_grads.items()}
                g_in = [flat_grads[b] if i is None else grads[i] for b, i in sources]
                counter = self._counter(it.value, np.int64, it) if narrow else it.value
                state = StepState(counter, tuple(map(value, owners["momentum"])), tuple(map(value, owners["average"])),
                                  skipped.value if skipped is not None else None)
                with uninterruptible():
                    params, new = chosen.apply(state, [value(o) for o in owners["variable"]], g_in, lr,
                                               grads_checked=True)
                    counter = self._counter(new.iterations, it.dtype, it) if narrow else new.iterations
                    values = [counter, *params, *new.momenta, *new.averages,
                              *([new.skipped] if skipped is not None else [])]
                    for owner, v in zip(targets, values, strict=True):
                        owner.bind(v) if isinstance(owner, FlatBuffer) else owner._bind(v)
        return run

    def _lr_value(self, config: SGDConfig) -> np.float32 | None:
        """The step's runtime learning rate: the float, a custom schedule's value at the current
        `iterations` (evaluated on the host), or None for a schedule the program computes."""
        lr = config.learning_rate
        if not isinstance(lr, LearningRateSchedule):
            return np.float32(lr)
        return None if schedules.is_compiled(lr) else schedules.evaluate(lr, self._step_count())

    def _constraint(self, v: Variable) -> Any:
        """`v.constraint` as a jitted function that keeps the variable's dtype and layout."""
        import jax
        import jax.numpy as jnp

        sharding = v.layout.named_sharding()
        key = (v.constraint, sharding)
        fn = self._constraints.get(key)
        if fn is None:
            c = v.constraint
            fn = self._constraints[key] = jax.jit(lambda w: jnp.asarray(c(w)).astype(w.dtype), out_shardings=sharding)
        return fn

    def _check_constraints(self, variables: Sequence[Variable]) -> None:
        """Each constraint must map the variable's shape to itself; checked (abstractly, once per
        constraint and layout) before the step, so that a bad one changes nothing."""
        import jax

        for v in variables:
            if v.constraint is None:
                continue
            try:
                out = jax.eval_shape(self._constraint(v), jax.ShapeDtypeStruct(v.shape, v.dtype))
            except Exception as e:
                raise ValueError(f"the constraint of variable {v.name!r} failed on an array of shape "
                                 f"{list(v.shape)} and dtype {v.dtype}: {e}") from e
            if tuple(out.shape) != v.shape:
                raise ValueError(f"the constraint of variable {v.name!r} returns shape {list(out.shape)}, but the "
                                 f"variable has shape {list(v.shape)}; a constraint must keep the shape")

    def _apply_constraints(self, variables: Sequence[Variable]) -> None:
        """tf_keras: `variable.assign(variable.constraint(variable))` after the step, for each
        variable it updated (after the EMA, which saw the unconstrained value)."""
        constrained = [v for v in variables if v.constraint is not None]
        assign_all(constrained, [self._constraint(v)(v.value) for v in constrained])

    def _decay_flags(self, variables: Sequence[Variable]) -> list[bool]:
        return [self._use_weight_decay(v) for v in variables]

    def _place_gradient(self, g: Any, v: Variable) -> Any:
        """The gradient as a jax.Array with the variable's sharding, or an error naming the variable.
        A live jax.Array of the variable's shape, dtype and (identical) sharding, the common case
        of a step, is recognised with three comparisons against what the variable's first
        gradient established (`_grad_specs`, per variable)."""
        import jax

        known = self._grad_specs.get(v._unique_id)
        if known is not None and isinstance(g, jax.Array) and g.shape == known[0] and g.dtype == known[1]:
            sharding = g.sharding
            if (sharding is known[2] or sharding == known[2]) and not g.is_deleted():
                return g
        placed = self._check_gradient(g, v)
        if placed is g:  # a jax.Array accepted as it is: the same signature passes the fast check next time
            self._grad_specs[v._unique_id] = (g.shape, g.dtype, g.sharding)
        return placed

    def _check_gradient(self, g: Any, v: Variable) -> Any:
        shape = tuple(g.shape) if hasattr(g, "shape") else tuple(np.shape(g))  # np.shape would copy to host
        if shape != v.shape:
            raise ValueError(f"gradient for variable {v.name!r} has shape {list(shape)}, but the variable has shape "
                             f"{list(v.shape)}; pass a gradient of the variable's shape")
        if hasattr(g, "is_deleted") and g.is_deleted():
            raise ValueError(f"gradient for variable {v.name!r} is a deleted (donated) array; pass a live array")
        dtype = np.dtype(g.dtype) if hasattr(g, "dtype") else np.asarray(g).dtype  # no host copy of a jax.Array
        if dtype != v.dtype:
            raise TypeError(f"gradient for variable {v.name!r} has dtype {dtype}, but the variable is {v.dtype} "
                            f"(tf_keras does not cast); cast it with .astype({v.dtype})")
        want = v.layout.named_sharding()
        if hasattr(g, "sharding"):
            if self._equivalent(g.sharding, want, len(shape)):
                return g
            if getattr(g, "committed", True) and len(g.sharding.device_set) > 1:
                raise ValueError(f"gradient for variable {v.name!r} is laid out as {g.sharding}, but the variable "
                                 f"is {want}; jax.device_put(gradient, variable.layout.named_sharding()) first")
        return backend.device_put(np.asarray(g), want)

    def _step(self, variables: Sequence[Variable], config: SGDConfig, decay: Sequence[bool],
              mesh: Mesh | None = None) -> Step:
        """The functional step for these variables and config (built once per signature).
        Variables are keyed by identity; the specs get unique names (`_unique_names`)."""
        if self._signature is None or self._signature[0] is not config:  # not rebuilt every step
            self._signature = (config, _program_config(config))
        signature = self._signature[1]
        key = (tuple(v._unique_id for v in variables), tuple(decay), signature)
        step = self._steps.get(key)
        if step is None:
            specs = self._specs(variables, decay)
            step = self._steps[key] = Step(StepProgram(signature, specs, mesh if mesh is not None else self.mesh))
        return step

    @staticmethod
    def _specs(variables: Sequence[Variable], decay: Sequence[bool]) -> tuple[VarSpec, ...]:
        """The variables as the step sees them (unique names, `_unique_names`)."""
        names = _unique_names([v._shared_name for v in variables])
        return tuple(VarSpec(n, v.shape, v.dtype, v.layout, d)  # VarSpec makes the dtype canonical
                     for n, v, d in zip(names, variables, decay))

    def _program(self, variables: Sequence[Variable], config: SGDConfig, decay: Sequence[bool]) -> StepProgram:
        """The program with the config as it is (a float learning rate included: artifacts record it)."""
        signature = self._step(variables, config, decay).program
        return StepProgram(config, signature.variables, signature.mesh)

    def _call(self, variables: Sequence[Variable], config: SGDConfig, decay: Sequence[bool], *,
              iterations: Variable | None = None) -> Callable[[Sequence[Any], np.float32 | None], None]:
        """One step of the functional core over these variables, resolved once (step, slots,
        counters): `run(grads, lr)` (`lr`: `_lr_value`) reads the state arrays, runs the step and
        binds its results to the variables and slots only after the step has run."""
        step = self._step(variables, config, decay)
        it = iterations if iterations is not None else self._iterations
        idx = [self._slot_index(v) for v in variables]
        momenta = [self._momenta[k] for k in idx]
        averages = [self._averages[k] for k in idx] if config.use_ema else []
        narrow = it.dtype != np.int64  # an int32 counter: the program reads int64 (see `iterations`)
        skipped = self._skipped if config.skip_nonfinite else None
        owners = [it, *variables, *momenta, *averages, *([skipped] if skipped is not None else [])]
        variables = list(variables)

        def run(grads: Sequence[Any], lr: np.float32 | None) -> None:
            with self._lock:
                counter = self._counter(it.value, np.int64, it) if narrow else it.value
                state = StepState(counter, tuple(m.value for m in momenta), tuple(a.value for a in averages),
                                  skipped.value if skipped is not None else None)
                # The inputs are donated by the step: from execute to the last bind, Ctrl-C waits (16.5).
                with uninterruptible():
                    params, new = step.apply(state, [v.value for v in variables], grads, lr,
                                             grads_checked=True)  # `_place_gradient` checked them
                    counter = self._counter(new.iterations, it.dtype, it) if narrow else new.iterations
                    values = [counter, *params, *new.momenta, *new.averages,
                              *([new.skipped] if skipped is not None else [])]
                    assign_all(owners, values)  # views of a flat bucket (update_step) are written into it
        return run

    @staticmethod
    def _counter(value: Any, dtype: Any, like: Variable) -> Any:
        """A scalar counter converted to `dtype` (int64 <-> int32, wrapping as C casts do), on
        `like`'s layout. A host round trip of one scalar: only an int32 counter takes it."""
        return backend.device_put(np.asarray(value).astype(dtype), like.layout.named_sharding())

    def update_step(self, gradient: Any, variable: Variable) -> None:
        """The per-variable update alone (momentum / Nesterov with the current learning rate):
        no clipping, weight decay, EMA or iteration increment, as Keras' `update_step`."""
        self.build([variable]) if not self._built else self._slot_index(variable)
        g = self._place_gradient(gradient, variable)
        core = dataclasses.replace(self._config, learning_rate=float(self.learning_rate), clipnorm=None,
                                   clipvalue=None, global_clipnorm=None, weight_decay=None, use_ema=False,
                                   skip_nonfinite=False)
        scratch = Variable(np.int64(0), name="update_step_counter", layout=Layout.replicated(self.mesh, 0),
                           dtype=np.int64)
        with self._lock:
            self._call([variable], core, [False], iterations=scratch)([g], np.float32(core.learning_rate))

    def compute_gradients(self, loss: Callable[[], Any], var_list: Any, tape: Any = None) -> list[tuple[Any, Variable]]:
        """(gradient, variable) pairs of a zero-argument `loss` by JAX autodiff; a variable the
        loss does not read gets `None`, as in Keras.

        As `tf.GradientTape.gradient`, a non-scalar loss is differentiated as the sum of its
        elements. A callable `var_list` is called after `loss()` (tf_keras' order), so variables
        the loss creates on its first call are included; `loss` then runs once more, traced.
        """
        import jax
        import jax.numpy as jnp

        if tape is not None:
            raise ValueError("`tape` is a TensorFlow GradientTape; sgdgen differentiates a zero-argument `loss` "
                             "callable with JAX instead: pass loss=lambda: ... and no tape")
        if not callable(loss):
            raise TypeError("`loss` must be a zero-argument callable that reads the variables, e.g. "
                            "lambda: (var ** 2) / 2")
        if callable(var_list):
            loss()
            var_list = var_list()
        variables = list(var_list)
        for v in variables:
            if not isinstance(v, Variable):
                raise TypeError(f"var_list holds a {type(v).__name__}; compute_gradients differentiates with respect "
                                "to sgdgen.Variable objects only")

        def f(values: list[Any]) -> Any:
            with substituted(variables, values):
                out = loss()
                out = out.value if isinstance(out, Variable) else out  # read inside: the value is the tracer
            return jnp.sum(out)  # the identity on a scalar

        flat = self._flat_differentiable(variables)
        # which variables the loss reads: a trace over per-variable abstract values (no device work)
        jaxpr = jax.make_jaxpr(f)([jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]).jaxpr
        used = {id(x) for e in jaxpr.eqns for x in e.invars} | {id(x) for x in jaxpr.outvars}
        if flat is None:
            grads = jax.grad(f)([v.value for v in variables])
        else:
            grads, by_bucket = self._flat_gradients(f, variables, flat)
            self._last_flat_grads = by_bucket
        return [(g if id(inv) in used else None, v) for g, v, inv in zip(grads, variables, jaxpr.invars)]

    def _flat_differentiable(self, variables: Sequence[Variable]) -> list[int] | None:
        """With flat buckets, the buckets a gradient of `variables` is taken over (every member of a
        listed variable's bucket), or None: no buckets, not built, or a variable it does not track."""
        if self._flat is None or any(self._index.get(v._unique_id) is None for v in variables):
            return None
        buckets = {self._flat.plan.members[self._index[v._unique_id]].bucket for v in variables}
        return sorted(b for b in buckets if self._flat.flat(b)) or None

    def _flat_gradients(self, f: Callable[[list[Any]], Any], variables: Sequence[Variable],
                        buckets: Sequence[int]) -> tuple[list[Any], dict[int, Any]]:
        """`jax.grad` of `f` with respect to the flat buckets: each member of `buckets` reads a slice
        of its traced bucket, so the buckets' gradients come flat. Returns the per-variable
        gradients of `variables` (slices of the flat ones) and the flat ones by bucket."""
        import jax

        flat, plan = self._flat, self._flat.plan
        own = [v for v in variables if not flat.flat(plan.members[self._index[v._unique_id]].bucket)]

        def g(bufs: list[Any], own_values: list[Any]) -> Any:
            sliced = {k: buf[m.offset:m.offset + m.size].reshape(m.shape)
                      for b, buf in zip(buckets, bufs) for k in plan.contents[b] for m in (plan.members[k],)}
            own_of = dict(zip((v._unique_id for v in own), own_values))
            return f([own_of[v._unique_id] if v._unique_id in own_of else sliced[self._index[v._unique_id]]
                      for v in variables])

        bufs = [flat.buffers[b]["variable"].array for b in buckets]
        gb, go = jax.grad(g, argnums=(0, 1))(bufs, [v.value for v in own])
        by_bucket = dict(zip(buckets, gb))
        per_member: dict[int, Any] = {}
        for b in buckets:
            for k, x in zip(plan.contents[b], flat.unpack(b, by_bucket[b])):
                per_member[k] = x
        own_grads = dict(zip((v._unique_id for v in own), go))
        grads = [own_grads[v._unique_id] if v._unique_id in own_grads else per_member[self._index[v._unique_id]]
                 for v in variables]
        return grads, by_bucket

    def minimize(self, loss: Callable[[], Any], var_list: Any, tape: Any = None) -> None:
        """compute_gradients + apply_gradients. Returns None, as the seed documents. With flat
        buckets (once built) the gradients are taken with respect to the buckets and applied
        flat, without packing."""
        with self._lock:  # the loss reads the variables a concurrent step would donate
            self._last_flat_grads = None
            pairs = self.compute_gradients(loss, var_list, tape)
            flat, self._last_flat_grads = self._last_flat_grads, None
            if flat is None:
                self.apply_gradients(pairs)
                return
            self._apply_gradients(pairs, None, flat_grads=flat)

    # ---- artifacts ---------------------------------------------------------------------
    def save_artifact(self, path: Any, *, platforms: Sequence[str] | None = None) -> Any:
        """Writes the compiled step for the built variables (see `sgdgen.io.artifact`); `platforms`:
        what its `step.jaxexport` is lowered for (default this machine's platform, () for none)."""
        from sgdgen.io import artifact

        if not self._built:
            raise RuntimeError("build the optimizer (opt.build(variables)) before saving its artifact")
        lr = self._config.learning_rate
        if isinstance(lr, LearningRateSchedule) and not schedules.is_compiled(lr):
            raise ValueError(f"learning_rate: the custom schedule {type(lr).__name__} is evaluated on the host each "
                             "step and cannot be stored in an artifact; use a float or one of "
                             f"{', '.join(schedules.SCHEDULES)}")
        if self._flat is not None:  # the bucketed program, over all buckets, and the variables they hold
            program = StepProgram(self._config, self._flat.plan.buckets, self.mesh)
            return artifact.write(program, path, platforms=platforms, members=self._flat.plan.variables)
        program = self._program(self._tracked, self._config, self._decay_flags(self._tracked))
        return artifact.write(program, path, platforms=platforms)

    @classmethod
    def load_artifact(cls, path: Any, variables: Sequence[Variable], *, mesh: Any = None,
                      exclude_from_weight_decay: Iterable[Variable] | None = None) -> SGD:
        """An optimizer built on `variables` whose step is loaded from an artifact (no compile
        when the artifact holds an executable for this platform). The artifact's config,
        mesh and variables' signature must match; otherwise an error says what differs.
        Weight decay per variable is read from the artifact, or from `exclude_from_weight_decay`
        (needed for a bucketed artifact whose buckets of one dtype differ in weight decay).
        A bucketed artifact's plan is rebuilt from `variables` and must match the stored one."""
        with gcpause.paused():  # thousands of objects at once (sgdgen.runtime.gcpause)
            return cls._load_artifact(path, list(variables), mesh, exclude_from_weight_decay)

    @classmethod
    def _load_artifact(cls, path: Any, variables: list[Variable], mesh: Any,
                       exclude_from_weight_decay: Iterable[Variable] | None) -> SGD:
        from sgdgen.io import artifact
        from sgdgen.runtime.cache import default_cache

        art = artifact.read(path)  # read and verified once
        opt = cls.from_config(art.manifest.config, mesh=mesh if mesh is not None else art.program.mesh)
        if exclude_from_weight_decay is not None:
            excluded = {v._unique_id for v in exclude_from_weight_decay}
            decay = [v._unique_id not in excluded for v in variables]
        elif art.manifest.members is not None:  # a bucketed artifact records each variable's flag
            recorded = {m.get("name"): m.get("decay", True) for m in art.manifest.members if isinstance(m, dict)}
            names = _unique_names([v._shared_name for v in variables])
            missing = [n for n in names if n not in recorded]
            if missing:
                raise ArtifactError(f"the artifact's buckets hold no variable named {missing[0]!r} (it holds "
                                    f"{sorted(recorded)[:5]}...); load it with the variables it was saved with")
            decay = [bool(recorded[n]) for n in names]
        elif opt._config.buckets:  # written before members were recorded
            decay = _bucketed_decay(variables, art.program.variables)
        else:
            decay = [v.decay for v in art.program.variables]
        art.check(mesh=opt.mesh)
        common = opt._common_mesh(variables)
        specs = opt._specs(variables, decay)  # made once: the check below and build use them
        plan = opt._bucket_plan(specs, common)
        art.check(variables=list(plan.buckets) if plan is not None else list(specs))
        default_cache().put(art.program, art.executable())  # this process's step for the program
        opt.exclude_from_weight_decay(var_list=[v for v, d in zip(variables, decay) if not d])
        opt._build(variables, (common, specs, plan))
        return opt

    # ---- checkpoints (orbax) ------------------------------------------------------------
    def _logical(self, slot: Variable, k: int) -> Any:
        """A slot's array as checkpoints hold it: a padded weight-update-sharded slot unpadded, in
        its variable's shape and layout, so that any optimizer (sharded or not) can restore it."""
        if not _padded(slot):
            return slot.value
        import jax
        import jax.numpy as jnp

        from sgdgen.frontend.zero import unpad

        plan = slot._plan
        return jax.jit(lambda x: unpad(plan, x, jnp), out_shardings=self._tracked[k].layout.named_sharding())(
            slot.value)

    def save_checkpoint(self, directory: Any, step: int | None = None, **extra: Any) -> int:
        """Saves variables, momenta, EMA averages and `iterations`, with their shardings, and the
        config, as checkpoint `step` (default: the current `iterations`) under `directory`, a path
        or an `orbax.checkpoint.CheckpointManager`; `extra` items (`ocp.args.StandardSave(...)`)
        are saved in the same step. Atomic (orbax renames a finished temporary directory).
        In a multi-process run every process calls it. Returns the step."""
        from sgdgen.io import checkpoint

        if not self._built:
            raise RuntimeError("build the optimizer (opt.build(variables)) before saving a checkpoint")
        tree = checkpoint.state_tree(self._iterations.value, [v.value for v in self._tracked],
                                     [self._logical(m, k) for k, m in enumerate(self._momenta)],
                                     [self._logical(a, k) for k, a in enumerate(self._averages)],
                                     self._skipped.value if self._config.skip_nonfinite else None)
        specs = [checkpoint.spec(v._shared_name, v.shape, v.dtype, v.layout) for v in self._tracked]
        step = int(self._iterations.numpy()) if step is None else step
        return checkpoint.save(directory, step, tree, checkpoint.metadata(self.get_config(), specs), extra=extra)

    def restore_checkpoint(self, directory: Any, step: int | None = None, **extra: Any) -> dict[str, Any]:
        """Restores a checkpoint (default: the newest complete step) into this built optimizer and
        its variables, resharded to their current layouts (any mesh). Refuses, changing nothing,
        when a variable's name, shape or dtype or `use_ema` differs. The config is not changed
        (`SGD.from_config(checkpoint.read_metadata(d)["config"])` recreates the saved one).
        Returns the `extra` items restored with the given `ocp.args` restore args."""
        import jax

        from sgdgen.io import checkpoint

        if not self._built:
            raise RuntimeError("build the optimizer on its variables (opt.build(variables)) before restoring "
                               "a checkpoint into it")
        owners = [self._iterations, *self._tracked, *self._momenta, *self._averages]

        def abstract(v: Variable) -> Any:
            return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.layout.named_sharding())

        keeps_skipped = self._config.skip_nonfinite
        def slot_abstract(slot: Variable, k: int) -> Any:  # a padded ZeRO slot is stored unpadded
            return abstract(self._tracked[k] if _padded(slot) else slot)

        target = checkpoint.state_tree(abstract(self._iterations), [abstract(v) for v in self._tracked],
                                       [slot_abstract(m, k) for k, m in enumerate(self._momenta)],
                                       [slot_abstract(a, k) for k, a in enumerate(self._averages)],
                                       abstract(self._skipped) if keeps_skipped else None)
        specs = [checkpoint.spec(v._shared_name, v.shape, v.dtype, v.layout) for v in self._tracked]
        tree, _, restored = checkpoint.restore(
            directory, step, target, extra=extra,
            check=lambda meta: checkpoint.check_compatible(meta, specs, self._config.use_ema))
        slots = [*self._momenta, *self._averages]
        values = [tree["iterations"], *tree["variables"],
                  *(_repad(slot, value) for slot, value in zip(slots, [*tree["momenta"], *tree["averages"]]))]
        if keeps_skipped:  # a checkpoint written without skip_nonfinite counted no skipped steps
            owners.append(self._skipped)
            values.append(tree["skipped"] if "skipped" in tree else
                          backend.device_put(np.int64(0), self._skipped.layout.named_sharding()))
        with self._lock:  # not between another thread's execute and its bind
            assign_all(owners, values)  # a flat bucket's views: one write per bucket
        return restored


def _bucketed_decay(variables: Sequence[Variable], stored: Sequence[VarSpec]) -> list[bool]:
    """Each variable's weight-decay flag, read back from a bucketed artifact's program (`stored`):
    a variable with its own buffer has its spec there; a flat bucket's member takes the flag of
    the flat bucket(s) of its dtype. Where its dtype has both a decayed and an excluded flat
    bucket the flag is not recorded per variable: an error asks for the exclusions."""
    by_name = {s.name: s for s in stored}
    flags: dict[str, set[bool]] = {}
    for s in stored:
        if s.name.startswith("bucket/"):
            flags.setdefault(s.dtype, set()).add(s.decay)
    names = _unique_names([v._shared_name for v in variables])
    decay = []
    for n, v in zip(names, variables):
        own = by_name.get(n)
        if own is not None and not own.name.startswith("bucket/"):
            decay.append(own.decay)
            continue
        options = flags.get(canonical_dtype(v.dtype), {True})
        if len(options) > 1:
            raise ArtifactError(
                f"the artifact's flat buckets hold {canonical_dtype(v.dtype)} variables both with and without weight "
                f"decay, and which one {v.name!r} was in is not recorded: pass the variables excluded from weight "
                "decay when it was saved, SGD.load_artifact(path, variables, exclude_from_weight_decay=[...])")
        decay.append(next(iter(options)))
    return decay


def _padded(slot: Variable) -> bool:
    """Whether a slot is weight-update sharded with padding (its global shape is not its variable's)."""
    return slot._plan is not None and slot._plan.padded


def _repad(slot: Variable, value: Any) -> Any:
    """A restored slot value (in its variable's shape) laid out as `slot` is: padded when it is."""
    if not _padded(slot):
        return value
    import jax
    import jax.numpy as jnp

    plan = slot._plan
    return jax.jit(lambda x: pad(plan, x, jnp), out_shardings=slot.layout.named_sharding())(value)


@dataclasses.dataclass(eq=False)
class _RepeatedCall:
    """One resolved `apply_gradients` signature, for the calls that repeat it (a training loop):
    the same variables (identity, in order), gradients of the same array type, shape, dtype and
    sharding as the ones the full checks accepted, the same constraints and optimizer state
    objects. A match costs a few attribute reads per variable and hashes nothing, instead of
    the ~8 us per variable of the full checks; anything else takes the full path, which says
    what is wrong (issue 15.3)."""

    variables: tuple[Variable, ...]
    grads: tuple[tuple[type, Any, Any], ...]  # (type, aval: shape and dtype, sharding) per gradient
    values: tuple[type, ...]  # each variable's own array type (None's for a view): no tracer slips in
    constraints: tuple[Any, ...]
    state: tuple[Any, ...]
    run: Any

    @functools.cached_property
    def constrained(self) -> bool:
        return any(c is not None for c in self.constraints)

    @classmethod
    def of(cls, pairs: Sequence[tuple[Any, Variable]], state: tuple[Any, ...], run: Any) -> _RepeatedCall:
        variables = tuple(v for _, v in pairs)
        return cls(variables, tuple((type(g), g.aval, g.sharding) for g, _ in pairs),
                   tuple(type(v._array) for v in variables), tuple(v.constraint for v in variables), state, run)

    def gradients(self, pairs: Sequence[Any], state: tuple[Any, ...]) -> list[Any] | None:
        """The gradients of `pairs` when the call repeats this one, else None (the full path)."""
        if len(pairs) != len(self.variables) or not all(a is b for a, b in zip(state, self.state)):
            return None
        grads = []
        try:
            for (g, v), known, (kind, aval, sharding), value, c in zip(
                    pairs, self.variables, self.grads, self.values, self.constraints):
                if v is not known or type(g) is not kind or type(v._array) is not value or v.constraint is not c:
                    return None
                have, shaped = g.sharding, g.aval  # JAX interns avals: identity is the usual answer
                if (shaped is not aval and shaped != aval) or (have is not sharding and have != sharding) \
                        or g.is_deleted():
                    return None
                grads.append(g)
        except (TypeError, ValueError, AttributeError):  # not (gradient, variable) pairs: the full path says so
            return None
        return grads


def _refuse_tracers(pairs: Sequence[tuple[Any, Any]]) -> None:
    """Refuses JAX tracers (apply_gradients called inside jax.jit, jax.grad, vmap...): the stateful
    API donates and rebinds concrete buffers, which a trace cannot do (issue 16.12)."""
    import jax

    for g, v in pairs:
        view = isinstance(v, Variable) and v._view is not None  # a view holds no array of its own unless traced
        value = v._array if view else getattr(v, "value", None)
        for what, x in (("the gradient", g), ("the value", value)):
            if isinstance(x, jax.core.Tracer):
                raise StepTypeError(
                    f"apply_gradients got a JAX tracer as {what} of variable {getattr(v, 'name', v)!r}: it is being "
                    "called inside jax.jit, jax.grad or another JAX transformation. The stateful optimizer API "
                    "runs outside jit, on concrete arrays; inside jit use the functional step sgdgen.jax_step")


def _weight_value(v: Variable, w: Any, *, counter: bool) -> np.ndarray:
    """`w` as a host array of `v`'s shape and dtype, or an error naming `v` (set_weights checks all first)."""
    try:
        arr = np.asarray(w)
    except (TypeError, ValueError) as e:
        raise StepTypeError(f"set_weights: the value for {v.name} is not an array ({e}); pass a numeric array") from e
    if tuple(arr.shape) != v.shape:
        raise StepInputError(f"set_weights: {v.name} has shape {list(v.shape)}, got {list(arr.shape)}")
    if counter:
        if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)) or np.any(arr != np.trunc(arr)) or not (
                -2.0 ** 63 <= float(arr) < 2.0 ** 63):
            raise StepInputError(f"set_weights: {v.name} counts steps and needs a finite integer within int64, "
                                 f"got {arr.tolist()!r} ({arr.dtype}); pass e.g. np.int64(10)")
        return np.array(int(arr), np.int64) if arr.dtype.kind == "f" else np.array(arr, np.int64)
    if arr.dtype.kind != "b" and not np.can_cast(arr.dtype, v.dtype, casting="same_kind"):
        raise StepTypeError(f"set_weights: the value for {v.name} has dtype {arr.dtype}, which does not convert to "
                            f"{v.dtype}; pass a numeric array")
    return np.array(arr, v.dtype, copy=True)


def _is_variable(x: Any) -> bool:
    """An sgdgen.Variable, or another framework's variable (keras.Variable, tf.Variable)."""
    return isinstance(x, Variable) or (hasattr(x, "assign") and hasattr(x, "trainable"))


def _not_a_variable(v: Any) -> str:
    """The message for a non-sgdgen variable in a (gradient, variable) list: what it is and what to do."""
    kind = f"{type(v).__module__.split('.')[0]}.{type(v).__name__}"
    if _is_variable(v):
        name = getattr(v, "path", None) or getattr(v, "name", "...")
        return (f"expected sgdgen.Variable, got {kind} {name!r}; sgdgen.SGD updates its own variables: create "
                f"them as sgdgen.Variable(value, layout=..., name={name!r}) (e.g. from {type(v).__name__}.numpy()) "
                "and read the trained values back with .numpy()")
    return (f"expected sgdgen.Variable, got {kind}; wrap arrays with sgdgen.Variable(array, layout=..., name=...) "
            "and pass (gradient, variable) pairs")
