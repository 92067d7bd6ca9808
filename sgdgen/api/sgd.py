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
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sgdgen import backend
from sgdgen.api.variable import Variable, substituted
from sgdgen.codegen.abi import StepState, slot_name
from sgdgen.errors import UnknownVariableError
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.schedules import LearningRateSchedule
from sgdgen.frontend.spec import Layout, Mesh, SpecError, VarSpec, canonical_dtype, numpy_dtype
from sgdgen.runtime.core import Step
from sgdgen.runtime.executable import ShardingMatcher
from sgdgen.runtime.program import StepProgram

_NOT_SETTABLE = ("This optimizer was created with a `LearningRateSchedule` object as its `learning_rate` "
                 "constructor argument, hence its learning rate is not settable. If you need the learning rate "
                 "to be settable, you should instantiate the optimizer with a float `learning_rate` argument.")


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

    Note: Keras 3 calls a callable learning rate at every read; tf_keras, and sgdgen, once.
    """

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 amsgrad: bool = False, gradients_clip_option: Any = None, ema_option: Any = None,
                 jit_compile: bool = False, name: str = "SGD", mesh: Any = None, **kwargs: Any):
        self._config = SGDConfig.create(learning_rate, momentum, nesterov, amsgrad, gradients_clip_option,
                                        ema_option, jit_compile, name, **kwargs)
        self._mesh = Mesh.of(mesh) if mesh is not None else None
        self._iterations = Variable(np.int64(0), name="iteration", mesh=self._mesh, dtype=np.int64)
        self._built = False
        self._index: dict[int, int] = {}
        self._tracked: list[Variable] = []
        self._momenta: list[Variable] = []
        self._averages: list[Variable] = []
        self._extra: list[Variable] = []
        self._exclude_ids: set[int] = set()
        self._exclude_names: list[str] = []
        self._steps: dict[tuple[Any, ...], Step] = {}  # per (variable set, config signature): no per-step rebuild
        self._equivalent = ShardingMatcher()

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

    @property
    def learning_rate(self) -> np.float32:
        """The learning rate of the next step (a schedule's value at the current `iterations`)."""
        lr = self._config.learning_rate
        if isinstance(lr, LearningRateSchedule):
            return lr(int(self._iterations.numpy()))
        return np.float32(lr)

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if self._config.lr_is_schedule:
            raise TypeError(_NOT_SETTABLE)
        if isinstance(value, LearningRateSchedule):
            raise TypeError("`learning_rate` of an optimizer built with a float cannot become a schedule; "
                            "create a new optimizer with learning_rate=<schedule>")
        new = SGDConfig.create(learning_rate=value).learning_rate  # same conversion rules as the constructor
        self._config = dataclasses.replace(self._config, learning_rate=new)

    lr = learning_rate

    @property
    def iterations(self) -> Variable:
        """The int64 step counter (replicated); the first entry of `variables`."""
        return self._iterations

    @iterations.setter
    def iterations(self, variable: Any) -> None:
        if self._built:
            raise RuntimeError("Cannot set `iterations` to a new Variable after the Optimizer weights have been "
                               "created. Here it is attempting to set `iterations` to a new Variable.")
        if not isinstance(variable, Variable) or variable.dtype != np.int64 or variable.shape != ():
            raise TypeError("`iterations` must be a scalar int64 sgdgen.Variable, e.g. "
                            "sgdgen.Variable(np.int64(10), dtype=np.int64, name='iteration')")
        self._iterations = variable

    def get_config(self) -> dict[str, Any]:
        """Keras' keys and order (SEMANTICS §8); JSON-serialisable."""
        return self._config.get_config()

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None, *,
                    mesh: Any = None) -> SGD:
        """Creates an optimizer from `get_config()` output (a tf_keras SGD config reads too)."""
        cfg = SGDConfig.from_config(dict(config))
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
                                    initial_value: Any = None) -> Variable:
        """A slot with the model variable's shape, dtype and layout: "{name}/{variable_name}/{var}"."""
        init = model_variable.value if initial_value is None and variable_name == "average" else (
            np.zeros(model_variable.shape, model_variable.dtype) if initial_value is None
            else np.asarray(initial_value, model_variable.dtype))
        role = {"m": "momentum", "average": "average"}.get(variable_name)
        name = (slot_name(self.name, role, model_variable._shared_name) if role
                else f"{self.name}/{variable_name}/{model_variable._shared_name}")
        return Variable(init, name=name, layout=model_variable.layout)

    def exclude_from_weight_decay(self, var_list: Iterable[Variable] | None = None,
                                  var_names: Iterable[str] | None = None) -> None:
        """Variables (by object, or by `re.search` of a pattern in `var.name`, which ends in ':0')
        that weight decay skips. Must be called before `build`; each call replaces both lists."""
        if self._built:
            raise ValueError("`exclude_from_weight_decay()` can only be configued before the optimizer is built.")
        self._exclude_ids = {v._unique_id for v in (var_list or [])}
        self._exclude_names = list(var_names or [])

    def _use_weight_decay(self, var: Variable) -> bool:
        if var._unique_id in self._exclude_ids:
            return False
        return not any(re.search(p, var.name) for p in self._exclude_names)

    def build(self, var_list: Sequence[Variable]) -> None:
        """Creates the slots: a momentum per variable (always), an EMA average (a copy of the
        variable) with use_ema; moves `iterations` to the variables' mesh. Runs once."""
        if self._built:
            return
        var_list = list(var_list)
        mesh = self._common_mesh(var_list)
        if self._iterations.mesh != mesh:
            it = self._iterations.numpy()
            self._iterations = Variable(it, name="iteration", layout=Layout.replicated(mesh, 0), dtype=np.int64)
        for k, v in enumerate(var_list):
            self._index[v._unique_id] = k
        self._tracked = var_list
        if self._config.use_ema:
            self._averages = [self.add_variable_from_reference(v, "average") for v in var_list]
        self._momenta = [self.add_variable_from_reference(v, "m") for v in var_list]
        self._built = True

    def _common_mesh(self, var_list: Sequence[Variable]) -> Mesh:
        for v in var_list:
            if not isinstance(v, Variable):
                raise TypeError(f"expected sgdgen.Variable, got {type(v).__name__}; wrap arrays with "
                                "sgdgen.Variable(array, layout=..., name=...)")
            canonical_dtype(v.dtype, what=f"variable {v.name!r}")  # integer variables are refused here
        mesh = self._mesh if self._mesh is not None else (var_list[0].mesh if var_list else Mesh(()))
        for v in var_list:
            if v.mesh != mesh:
                raise SpecError(f"variable {v.name!r} is laid out on mesh {v.mesh}, but the optimizer's mesh is "
                                f"{mesh}; create its Layout on the optimizer's mesh")
        return mesh

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets `variables` (same order) from arrays; checks every shape first."""
        current = self.variables
        if len(weights) != len(current):
            raise ValueError(f"set_weights expects {len(current)} arrays (the order of `variables`: "
                             f"{[v.name for v in current]}), got {len(weights)}")
        for v, w in zip(current, weights):
            if tuple(np.shape(w)) != v.shape:
                raise ValueError(f"set_weights: {v.name} has shape {list(v.shape)}, got {list(np.shape(w))}")
        for v, w in zip(current, weights):
            v.assign(np.asarray(w))

    def get_weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.variables]

    def finalize_variable_values(self, var_list: Sequence[Variable]) -> None:
        """With use_ema, copies each variable's moving average into it (`model.fit` does this at the end)."""
        if not self._config.use_ema:
            return
        for v in var_list:
            k = self._slot_index(v)
            v.assign(self._averages[k].value)

    def _slot_index(self, v: Variable) -> int:
        k = self._index.get(getattr(v, "_unique_id", None))
        if k is None:
            raise UnknownVariableError(f"The optimizer cannot recognize variable {getattr(v, 'name', v)}. This usually means "
                           "you are trying to call the optimizer to update different parts of the model separately. "
                           "Please call `optimizer.build(variables)` with the full list of trainable variables "
                           "before the training loop or use legacy optimizer `tf.keras.optimizers.legacy.SGD.")
        return k

    # ---- the step ----------------------------------------------------------------------
    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Variable]], name: str | None = None,
                        skip_gradients_aggregation: bool = False, **kwargs: Any) -> Variable:
        """Applies one step to every variable with a gradient, as ONE compiled program.

        A `None` gradient skips its variable entirely (no decay, update or EMA), with a
        warning; all-None raises. Returns `iterations`.
        """
        pairs = list(grads_and_vars)
        if not pairs:
            return self._iterations
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        if all(g is None for g in grads):
            raise ValueError(f"No gradients provided for any variable: ({[getattr(v, 'name', v) for v in variables]},"
                             f"). Provided `grads_and_vars` is {tuple(pairs)}.")
        self._common_mesh(variables)
        seen: dict[int, str] = {}
        for v in variables:
            if v._unique_id in seen:
                raise ValueError(f"variable {v.name!r} appears twice in grads_and_vars; give each variable once")
            seen[v._unique_id] = v.name
        present = [(g, v) for g, v in pairs if g is not None]
        placed = [self._place_gradient(g, v) for g, v in present]  # checks before any state changes
        if self._built:
            for _, v in present:
                self._slot_index(v)
        missing = [v.name for g, v in pairs if g is None]
        if missing:
            warnings.warn(f"Gradients do not exist for variables {missing} when minimizing the loss. If you're "
                          "using `model.compile()`, did you forget to provide a `loss` argument?", stacklevel=2)
        self.build(variables)
        self._run([v for _, v in present], placed, self._config, self._decay_flags([v for _, v in present]))
        return self._iterations

    def _decay_flags(self, variables: Sequence[Variable]) -> list[bool]:
        return [self._use_weight_decay(v) for v in variables]

    def _place_gradient(self, g: Any, v: Variable) -> Any:
        """The gradient as a jax.Array with the variable's sharding, or an error naming the variable."""
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

    def _step(self, variables: Sequence[Variable], config: SGDConfig, decay: Sequence[bool]) -> Step:
        """The functional step for these variables and config (built once per signature)."""
        signature = config if config.lr_is_schedule else dataclasses.replace(config, learning_rate=0.0)
        key = (tuple(v._unique_id for v in variables), tuple(decay), signature)
        step = self._steps.get(key)
        if step is None:
            specs = tuple(VarSpec(v._shared_name, v.shape, canonical_dtype(v.dtype), v.layout, d)
                          for v, d in zip(variables, decay))
            step = self._steps[key] = Step(StepProgram(signature, specs, self.mesh))
        return step

    def _program(self, variables: Sequence[Variable], config: SGDConfig, decay: Sequence[bool]) -> StepProgram:
        """The program with the config as it is (a float learning rate included: artifacts record it)."""
        signature = self._step(variables, config, decay).program
        return StepProgram(config, signature.variables, signature.mesh)

    def _run(self, variables: Sequence[Variable], grads: Sequence[Any], config: SGDConfig,
             decay: Sequence[bool], *, iterations: Variable | None = None) -> None:
        """One step of the functional core over these variables' arrays; the results are bound
        back to the variables and slots only after the step has run."""
        step = self._step(variables, config, decay)
        it = iterations if iterations is not None else self._iterations
        idx = [self._slot_index(v) for v in variables]
        momenta = [self._momenta[k] for k in idx]
        averages = [self._averages[k] for k in idx] if config.use_ema else []
        state = StepState(it.value, tuple(m.value for m in momenta), tuple(a.value for a in averages))
        lr = None if config.lr_is_schedule else np.float32(config.learning_rate)
        params, new = step.apply(state, [v.value for v in variables], grads, lr)
        for owner, value in zip([it, *variables, *momenta, *averages],
                                [new.iterations, *params, *new.momenta, *new.averages]):
            owner._bind(value)

    def update_step(self, gradient: Any, variable: Variable) -> None:
        """The per-variable update alone (momentum / Nesterov with the current learning rate):
        no clipping, weight decay, EMA or iteration increment, as Keras' `update_step`."""
        self.build([variable]) if not self._built else self._slot_index(variable)
        g = self._place_gradient(gradient, variable)
        core = dataclasses.replace(self._config, learning_rate=float(self.learning_rate), clipnorm=None,
                                   clipvalue=None, global_clipnorm=None, weight_decay=None, use_ema=False)
        scratch = Variable(np.int64(0), name="update_step_counter", layout=Layout.replicated(self.mesh, 0),
                           dtype=np.int64)
        self._run([variable], [g], core, [False], iterations=scratch)

    def compute_gradients(self, loss: Callable[[], Any], var_list: Any, tape: Any = None) -> list[tuple[Any, Variable]]:
        """(gradient, variable) pairs of a zero-argument `loss` by JAX autodiff; a variable the
        loss does not read gets `None`, as in Keras."""
        import jax

        if tape is not None:
            raise ValueError("`tape` is a TensorFlow GradientTape; sgdgen differentiates a zero-argument `loss` "
                             "callable with JAX instead: pass loss=lambda: ... and no tape")
        if not callable(loss):
            raise TypeError("`loss` must be a zero-argument callable that reads the variables, e.g. "
                            "lambda: (var ** 2) / 2")
        variables = list(var_list() if callable(var_list) else var_list)

        def f(values: list[Any]) -> Any:
            with substituted(variables, values):
                return loss()

        values = [v.value for v in variables]
        jaxpr = jax.make_jaxpr(f)(values).jaxpr
        used = {id(x) for e in jaxpr.eqns for x in e.invars} | {id(x) for x in jaxpr.outvars}
        grads = jax.grad(f)(values)
        return [(g if id(inv) in used else None, v) for g, v, inv in zip(grads, variables, jaxpr.invars)]

    def minimize(self, loss: Callable[[], Any], var_list: Any, tape: Any = None) -> None:
        """compute_gradients + apply_gradients. Returns None, as the seed documents."""
        self.apply_gradients(self.compute_gradients(loss, var_list, tape))

    # ---- artifacts ---------------------------------------------------------------------
    def save_artifact(self, path: Any) -> Any:
        """Writes the compiled step for the built variables (see `sgdgen.io.artifact`)."""
        from sgdgen.io import artifact

        if not self._built:
            raise RuntimeError("build the optimizer (opt.build(variables)) before saving its artifact")
        program = self._program(self._tracked, self._config, self._decay_flags(self._tracked))
        return artifact.write(program, path)

    @classmethod
    def load_artifact(cls, path: Any, variables: Sequence[Variable], *, mesh: Any = None) -> SGD:
        """An optimizer built on `variables` whose step is loaded from an artifact (no compile
        when the artifact holds an executable for this platform). The artifact's config,
        mesh and variables' signature must match; otherwise an error says what differs."""
        from sgdgen.io import artifact
        from sgdgen.runtime.program import register_executable

        variables = list(variables)
        art = artifact.read(path)
        opt = cls.from_config(art.manifest["config"], mesh=mesh if mesh is not None else art.program.mesh)
        decay = [v.decay for v in art.program.variables]
        given = list(opt._program(variables, opt._config, decay).variables)
        artifact.read(path, mesh=opt.mesh, variables=given)
        register_executable(art.program, art.executable())
        opt.exclude_from_weight_decay(var_list=[v for v, d in zip(variables, decay) if not d])
        opt.build(variables)
        return opt

    # ---- checkpoints (orbax) ------------------------------------------------------------
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
                                     [m.value for m in self._momenta], [a.value for a in self._averages])
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

        target = checkpoint.state_tree(abstract(self._iterations), [abstract(v) for v in self._tracked],
                                       [abstract(m) for m in self._momenta], [abstract(a) for a in self._averages])
        specs = [checkpoint.spec(v._shared_name, v.shape, v.dtype, v.layout) for v in self._tracked]
        tree, _, restored = checkpoint.restore(
            directory, step, target, extra=extra,
            check=lambda meta: checkpoint.check_compatible(meta, specs, self._config.use_ema))
        values = [tree["iterations"], *tree["variables"], *tree["momenta"], *tree["averages"]]
        for owner, value in zip(owners, values):
            owner._bind(value)
        return restored
