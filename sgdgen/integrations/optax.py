"""`sgdgen.optax.sgd`: tf_keras' SGD as an `optax.GradientTransformation` whose update is the
generated step (`sgdgen.jax_step`), for `optax.chain`, `optax.MultiSteps` and `optax.masked`.

    tx = optax.chain(optax.clip(1.0), sgdgen.optax.sgd(0.1, momentum=0.9, nesterov=True))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

optax speaks in updates that `apply_updates` adds to the params; the step computes the new
params. `update` returns `new - params`, computed in the param dtype. By Sterbenz' lemma that
difference is exact, and `params + updates` gives the step's params bit for bit, wherever
`new` is within a factor 2 of `params` (the usual case: a step moves a weight by much less
than itself); elsewhere `apply_updates` rounds twice and lands within 1 ulp of
max(|new|, |params|) (measured in tests/test_optax.py). Where that ulp matters, call
`sgdgen.jax_step` directly: it returns the new params themselves.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import optax

from sgdgen.codegen.abi import StepState
from sgdgen.errors import StepInputError
from sgdgen.frontend.config import SGDConfig
from sgdgen.integrations.jax import JaxStep, jax_step

#: Where `optax.chain(clip_by_global_norm, add_decayed_weights, sgd(momentum, nesterov))` differs.
OPTAX_DIFFERENCES = (
    "weight decay: sgdgen decays decoupled, var - var*wd*lr before the update; optax.add_decayed_weights adds "
    "wd*var to the gradient, which then goes through the momentum trace (equal only without momentum)",
    "momentum: sgdgen's slot is m = -lr*t (Keras); optax.sgd keeps the trace t = g + mom*t and applies -lr*t: "
    "the same params with a constant learning rate, not with a schedule",
    "global clip: sgdgen scales by c*min(1/n, 1/c) always; optax.clip_by_global_norm only when n >= c",
    "EMA and its overwrite live in the state (no optax equivalent)",
    "the state's iterations count the steps sgd itself applied (under MultiSteps: the accumulated ones)",
)


class SgdgenState(NamedTuple):
    """The optax state: the step's `StepState` (iterations, momenta, EMA averages)."""

    step: StepState


def _spec(leaf: Any) -> jax.ShapeDtypeStruct:
    """A leaf as the step is built on it (hashable): shape, dtype and, for a concrete array, its sharding."""
    concrete = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding if concrete else None)


def sgd(learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False, *,
        exclude_from_weight_decay: tuple[str, ...] = (), **options: Any) -> optax.GradientTransformation:
    """tf_keras 2.21's SGD (docs/numerics.md) as an optax transformation.

    Takes `sgdgen.SGD`'s arguments (weight_decay, clipnorm, clipvalue, global_clipnorm,
    use_ema, ema_momentum, ema_overwrite_frequency, a schedule as learning_rate);
    `exclude_from_weight_decay` holds regular expressions on leaf names ("dense/kernel").
    `update` needs `params`. The step is built on the first `init`'s params (shapes, dtypes,
    NamedShardings); later calls must pass pytrees of that structure.
    """
    config = SGDConfig.create(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, **options)

    @functools.lru_cache(maxsize=16)
    def build(treedef: Any, specs: tuple[jax.ShapeDtypeStruct, ...]) -> JaxStep:
        return jax_step(config, jax.tree_util.tree_unflatten(treedef, list(specs)),
                        exclude_from_weight_decay=exclude_from_weight_decay)

    def step_for(params: Any) -> JaxStep:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        return build(treedef, tuple(_spec(x) for x in leaves))

    def init(params: Any) -> SgdgenState:
        return SgdgenState(step_for(params).init(params))

    def update(updates: Any, state: SgdgenState, params: Any = None) -> tuple[Any, SgdgenState]:
        if params is None:
            raise StepInputError("sgdgen.optax.sgd needs params: call tx.update(grads, state, params)")
        new, step_state = step_for(params)(params, updates, state.step)
        deltas = jax.tree_util.tree_map(lambda n, p: (n - p).astype(p.dtype), new, params)
        return deltas, SgdgenState(step_state)

    return optax.GradientTransformation(init, update)


__all__ = ["OPTAX_DIFFERENCES", "SgdgenState", "sgd"]
