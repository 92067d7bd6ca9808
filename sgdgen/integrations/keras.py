"""`sgdgen.keras.SGD`: a Keras 3 optimizer (JAX backend) whose update is sgdgen's generated step.

    model.compile(optimizer=sgdgen.keras.SGD(0.1, momentum=0.9, nesterov=True), loss="mse")
    model.fit(x, y, epochs=3)

`apply` reads the optimizer's variables (`iterations`, the momenta, the EMA averages), the
model's variables and the learning rate (Keras' float32 variable: a runtime operand, so
assigning `optimizer.learning_rate` between epochs does not recompile), calls the step of
`sgdgen.jax_step` (the `sgdgen_step` primitive: the generated, pass-rewritten module) and
assigns the results. Keras' `stateless_apply` runs `apply` in a `StatelessScope`, so the
JAX trainer's jitted train step holds the step inside its one XLA program. No maths here.

Numerics are tf_keras 2.21's (docs/numerics.md), not Keras 3's own SGD; the differences
are listed in `KERAS3_DIFFERENCES` and the README ("Keras 3").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import keras

from sgdgen.codegen.abi import StepState
from sgdgen.errors import ConfigError, StepInputError
from sgdgen.frontend import schedules
from sgdgen.frontend.config import SGDConfig
from sgdgen.integrations.jax import JaxStep, jax_step

if keras.backend.backend() != "jax":
    raise ImportError(f"sgdgen.keras needs Keras' JAX backend (the step is a JAX primitive), but Keras runs on "
                      f"{keras.backend.backend()!r}; set KERAS_BACKEND=jax before importing keras")

#: Where Keras 3's own `keras.optimizers.SGD` (and base Optimizer) differs from tf_keras 2.21, which
#: this optimizer follows (docs/numerics.md §6).
KERAS3_DIFFERENCES = (
    "EMA: Keras 3 starts the average at zeros and copies the weights at step 1; tf_keras starts it as a copy "
    "of the weights at build, so step 1 gives ema*w0 + (1-ema)*w1",
    "momentum 0: Keras 3 keeps no momentum slot; tf_keras writes m = -g*lr every step",
    "clip options: Keras 3 refuses any two of clipnorm/clipvalue/global_clipnorm; tf_keras refuses only "
    "clipnorm with global_clipnorm and ignores clipvalue beside a norm clip",
    "global norm: Keras 3 sqrt(sum(g**2)); tf_keras sqrt(2*sum(l2_loss(g))), accumulated wide",
    "a callable learning rate: Keras 3 calls it at every read; tf_keras calls it once, at construction",
    "gradients: Keras 3 casts a gradient to its variable's dtype; tf_keras refuses a mismatch",
)

_LOSS_SCALE = ("sgdgen.keras.SGD: loss_scale_factor={!r} is not supported: the generated step does not unscale "
               "gradients; pass loss_scale_factor=None (divide the loss scale out of the gradients yourself)")
_ACCUMULATE = ("sgdgen.keras.SGD: gradient_accumulation_steps={!r} is not supported: the generated step applies "
               "every gradient it is given; pass gradient_accumulation_steps=None (accumulate with "
               "optax.MultiSteps around sgdgen.optax.sgd, or in your own loop)")


def _learning_rates(value: Any) -> tuple[Any, Any]:
    """(Keras' learning_rate, sgdgen's): the same schedule in each library's class (their
    serialization dicts are the same), or one float32 number for both."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value, schedules.deserialize(keras.optimizers.schedules.serialize(value))
    if isinstance(value, schedules.LearningRateSchedule):
        return keras.optimizers.schedules.deserialize(schedules.serialize(value)), value
    if isinstance(value, dict):
        return _learning_rates(schedules.deserialize(value))
    lr = SGDConfig.create(learning_rate=value).learning_rate  # tf_keras: a callable is called once
    return lr, lr


@keras.saving.register_keras_serializable(package="sgdgen")
class SGD(keras.optimizers.Optimizer):
    """tf_keras 2.21's SGD (momentum, Nesterov, decoupled weight decay, clipnorm / clipvalue /
    global_clipnorm, EMA with overwrite, schedules) for Keras 3 `model.fit` on the JAX backend.

    Exclude variables from weight decay with Keras' `exclude_from_weight_decay(var_list=,
    var_names=)` before the optimizer is built. `loss_scale_factor` and
    `gradient_accumulation_steps` are accepted only at their default, None.
    """

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | None = None, clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None, use_ema: bool = False, ema_momentum: float = 0.99,
                 ema_overwrite_frequency: int | None = None, loss_scale_factor: float | None = None,
                 gradient_accumulation_steps: int | None = None, name: str = "SGD", **kwargs: Any) -> None:
        if loss_scale_factor is not None:
            raise ConfigError(_LOSS_SCALE.format(loss_scale_factor))
        if gradient_accumulation_steps is not None:
            raise ConfigError(_ACCUMULATE.format(gradient_accumulation_steps))
        keras_lr, sgd_lr = _learning_rates(learning_rate)
        config = SGDConfig.create(learning_rate=sgd_lr, momentum=momentum, nesterov=nesterov, name=name,
                                  weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                                  global_clipnorm=global_clipnorm, use_ema=use_ema, ema_momentum=ema_momentum,
                                  ema_overwrite_frequency=ema_overwrite_frequency, **kwargs)
        super().__init__(learning_rate=keras_lr, name=name)
        self.sgd_config = config
        # Keras' attributes, read by get_config and by users; Keras' own update (which would
        # use them) never runs: `apply` is the generated step.
        for key in ("momentum", "nesterov", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                    "ema_momentum", "ema_overwrite_frequency"):
            setattr(self, key, getattr(config, key))
        self._step: JaxStep | None = None
        self.momenta: list[Any] = []
        self.averages: list[Any] = []

    def build(self, variables: Sequence[Any]) -> None:
        """Creates a momentum slot per variable (and an EMA average starting as a copy of it),
        laid out as the variable (`add_optimizer_variables` takes each variable's layout), and
        the step for these variables' shapes, dtypes and shardings."""
        if self.built:
            return
        variables = list(variables)
        special = [v.path for v in variables if getattr(v, "overwrite_with_gradient", False)]
        if special:
            raise StepInputError(f"sgdgen.keras.SGD: variable {special[0]!r} has overwrite_with_gradient=True "
                                 "(float8 scaling state), which the generated step does not support; "
                                 "use a Keras optimizer for such models")
        super().build(variables)  # Keras' bookkeeping; with use_ema its "average" slots, laid out as each variable
        self.momenta = self.add_optimizer_variables(variables, "momentum")
        if self.sgd_config.use_ema:
            self.averages = list(self._model_variables_moving_average)
            for average, v in zip(self.averages, variables):
                average.assign(jax.numpy.array(v.value, copy=True))  # tf_keras: a copy (own buffer) of the variable
        order = {v.path: i for i, v in enumerate(variables)}
        excluded = [f"^{re.escape(v.path)}$" for v in variables if not self._use_weight_decay(v)]
        self._leaf_index = jax.tree_util.tree_leaves(order)  # the step's leaf order (sorted paths)
        self._step = jax_step(self.sgd_config, {v.path: v.value for v in variables},
                              exclude_from_weight_decay=excluded)
        self.built = True

    @property
    def step(self) -> JaxStep:
        """The generated step (`sgdgen.JaxStep`) of the variables the optimizer was built for."""
        if self._step is None:
            raise StepInputError("sgdgen.keras.SGD is not built yet: call optimizer.build(model.trainable_variables) "
                                 "or fit the model first")
        return self._step

    def _in_step_order(self, grads: Sequence[Any], variables: Sequence[Any]) -> list[Any]:
        """The gradients in the built variables' order; every variable needs one."""
        by_key = {self._var_key(v): g for g, v in zip(grads, variables)}
        missing = [v.path for v in self._trainable_variables
                   if by_key.get(self._var_key(v)) is None]
        if missing:
            raise StepInputError(f"sgdgen.keras.SGD: no gradient for variable {missing[0]!r}; the generated step "
                                 "updates all the variables it was built for at once: pass a gradient for each "
                                 "(zeros for a variable that should not move still get decay and momentum)")
        return [by_key[self._var_key(v)] for v in self._trainable_variables]

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """One generated step over all the built variables (eager, under jit, or inside
        `stateless_apply`'s scope); assigns variables, slots and `iterations`."""
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise StepInputError("sgdgen.keras.SGD: gradients without variables before the optimizer is built; "
                                     "call apply(grads, trainable_variables) or build(variables) first")
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
            self._check_variables_are_known(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise StepInputError(f"sgdgen.keras.SGD: {len(grads)} gradients for {len(trainable_variables)} variables; "
                                 "pass one gradient per variable")
        grads = self._in_step_order(grads, trainable_variables)
        is_schedule = isinstance(self._learning_rate, keras.optimizers.schedules.LearningRateSchedule)
        if is_schedule != self.sgd_config.lr_is_schedule:
            raise ConfigError("sgdgen.keras.SGD: optimizer.learning_rate was changed between a number and a schedule "
                              "after the optimizer was built; the step's program is fixed: create a new optimizer")
        variables = self._trainable_variables
        leaves = self._leaf_index
        params = {v.path: v.value for v in variables}
        grad_tree = {v.path: g for v, g in zip(variables, grads)}
        state = StepState(self._iterations.value, tuple(self.momenta[i].value for i in leaves),
                          tuple(self.averages[i].value for i in leaves) if self.averages else ())
        lr = None if is_schedule else self._learning_rate.value
        new_params, new_state = self.step(params, grad_tree, state, lr)
        for v in variables:
            v.assign(new_params[v.path])
        for k, i in enumerate(leaves):
            self.momenta[i].assign(new_state.momenta[k])
            if self.averages:
                self.averages[i].assign(new_state.averages[k])
        self._iterations.assign(keras.ops.cast(new_state.iterations, self._iterations.dtype))

    def _overwrite_model_variables_with_average_value(self, trainable_variables: Sequence[Any]) -> None:
        """Keras' EMA overwrite (`finalize_variable_values` at the end of `fit`), with a copy of
        each average: Keras assigns the average variable itself, so the weight and its average
        would share one buffer, and the next `fit` (which donates its whole state) would donate
        that buffer twice ("donate the same buffer twice", then Keras' `'NoneType' object is
        not callable` from the purged variable)."""
        averages = self._model_variables_moving_average
        if len(trainable_variables) != len(averages):
            raise StepInputError(f"sgdgen.keras.SGD: {len(trainable_variables)} variables to overwrite with their "
                                 f"moving averages, but the optimizer holds {len(averages)}; pass the variables "
                                 "the optimizer was built for")
        for v, average in zip(trainable_variables, averages):
            if average is not None:
                v.assign(jax.numpy.array(average.value, copy=True))

    def get_config(self) -> dict[str, Any]:
        """Keras 3's optimizer config (with `loss_scale_factor` and `gradient_accumulation_steps`,
        both None) plus `momentum` and `nesterov`; the learning rate is the current one."""
        config = super().get_config()
        config.update(momentum=self.sgd_config.momentum, nesterov=self.sgd_config.nesterov)
        return config


__all__ = ["KERAS3_DIFFERENCES", "SGD"]
