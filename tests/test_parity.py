"""sgdgen.SGD against its peers: Keras 3 (JAX backend) and optax, 20 steps, one device, float32.

Each peer is given the same initial weights and the same gradients; the weights after
every step must agree within rtol 1e-6 of max|peer| (atol = 1e-6 * max|peer|, rtol
1e-6): the formulas are the same and only rounding differs (sgdgen's compiled step
contracts `m*momentum - g*lr` into an FMA, SEMANTICS §12; the peers run op by op).
Gradients alternate between x0.05 (below every clip threshold used) and x1 (above).

Where Keras 3 matches tf_keras 2.21 (the reference sgdgen follows), and so sgdgen:
  plain SGD, momentum, Nesterov (Keras 3 writes `m*mom - g*lr`, tf_keras `-g*lr + m*mom`:
  the same value), decoupled weight decay `var - var*wd*lr` before the update with the
  step's learning rate, clipnorm `(g*c)/max(|g|, c)`, clipvalue, global_clipnorm
  `g * c*min(1/n, 1/c)`, and schedules evaluated at `iterations` before the increment.
  The global norm is `sqrt(2 * sum(l2_loss))` in tf_keras/sgdgen and `sqrt(sum(g**2))` in
  Keras 3: the same number up to rounding, so the weights agree to rounding.

Where they differ (SEMANTICS §13), so these configurations are not compared:
  * EMA: tf_keras/sgdgen start the average as a copy of the weights at build, and step 1
    gives `0.99*w0 + 0.01*w1`; Keras 3 starts it at zeros and forces the EMA momentum to 0
    while `iterations == 0`, so after step 1 the average is `w1`. Keras 3 also averages every
    trainable variable, sgdgen only those with a gradient this step. (Tested below.)
  * A callable learning rate is called once, at construction, by tf_keras/sgdgen; Keras 3
    calls it at every read (once per step, and once per variable for weight decay).
  * momentum 0: tf_keras/sgdgen keep a momentum slot and write `m = -g*lr` every step;
    Keras 3 creates no slot and does `var -= g*lr` (same weights, different state).
  * Clip options: tf_keras/sgdgen refuse only clipnorm with global_clipnorm and silently
    ignore clipvalue beside a norm clip; Keras 3 refuses any two of the three.
  * Keras 3 casts a gradient to the variable's dtype; tf_keras/sgdgen refuse a mismatch.
    Keras 3 wants a float learning rate and momentum; tf_keras/sgdgen take ints.

optax (weights compared, constant learning rate):
  * `optax.sgd(lr, momentum, nesterov)` keeps the trace `t = g + mom*t` and applies
    `-lr*t` (Nesterov: `-lr*(g + mom*t)`); Keras' slot is `m = -lr*t`. With a constant lr
    the weights are the same up to rounding (with a schedule they are not).
  * `optax.clip_by_global_norm(c)` scales by `c/n` only when `n >= c` and leaves the
    gradient untouched otherwise; tf_keras multiplies by `c*min(1/n, 1/c)` always (which
    can be 1 +- 1 ulp below the threshold): equal up to rounding.
  * `optax.add_decayed_weights(wd)` before `sgd(lr)` is coupled decay: `wd*w` is added to
    the gradient. Without momentum that is `w - lr*g - lr*wd*w`, the same as tf_keras'
    decoupled `w - w*wd*lr - g*lr`; with momentum the decay term would go through the
    momentum buffer in optax and not in tf_keras, so the two differ and only the
    momentum-free case is compared.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported (conftest already set XLA_FLAGS)

from typing import Any  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import sgdgen  # noqa: E402
from sgdgen.runtime import program  # noqa: E402

STEPS = 20
RTOL = 1e-6
SHAPES = [(8, 16), (16,), (4, 4, 3), ()]


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(private_xla_cache: Path) -> Path:
    return private_xla_cache


@pytest.fixture(scope="module")
def keras() -> Any:
    import keras

    if keras.backend.backend() != "jax":
        pytest.fail(f"keras was imported with the {keras.backend.backend()!r} backend before this module set "
                    "KERAS_BACKEND=jax")
    return keras


def problem(seed: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Initial weights and STEPS lists of gradients (x0.05 on even steps, x1 on odd ones)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * (0.05 if k % 2 == 0 else 1.0)).astype(np.float32) for s in SHAPES]
             for k in range(STEPS)]
    return init, grads


def sgdgen_trajectory(kwargs: dict[str, Any], init: list[np.ndarray],
                      grads: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    variables = [sgdgen.Variable(x, name=f"parity/w{i}") for i, x in enumerate(init)]
    opt = sgdgen.SGD(**kwargs)
    out = []
    for gs in grads:
        opt.apply_gradients(zip(gs, variables))
        out.append([v.numpy() for v in variables])
    return out


def keras_trajectory(keras: Any, kwargs: dict[str, Any], init: list[np.ndarray],
                     grads: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    variables = [keras.Variable(x, dtype="float32", name=f"w{i}") for i, x in enumerate(init)]
    opt = keras.optimizers.SGD(**kwargs)
    out = []
    for gs in grads:
        opt.apply_gradients(zip([jnp.asarray(g) for g in gs], variables))
        out.append([np.asarray(v.value) for v in variables])
    return out


def optax_trajectory(tx: Any, init: list[np.ndarray], grads: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    import optax

    params = [jnp.asarray(x) for x in init]
    state = tx.init(params)
    out = []
    for gs in grads:
        updates, state = tx.update([jnp.asarray(g) for g in gs], state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(p) for p in params])
    return out


def assert_same_trajectory(got: list[list[np.ndarray]], want: list[list[np.ndarray]], what: str) -> None:
    assert len(got) == len(want) == STEPS
    for k, (gs, ws) in enumerate(zip(got, want), 1):
        for i, (g, w) in enumerate(zip(gs, ws)):
            assert g.dtype == np.float32 and g.shape == w.shape
            scale = float(np.max(np.abs(w), initial=0.0))
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * scale,
                                       err_msg=f"{what}: variable {i} after step {k}")
    # the configuration did train: the weights moved well beyond the tolerance
    moved = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(got[-1], got[0]))
    assert moved > 1e-3, what


# ---- Keras 3 --------------------------------------------------------------------------------

KERAS_CASES = {
    "plain": dict(learning_rate=0.1),
    "momentum": dict(learning_rate=0.1, momentum=0.9),
    "nesterov": dict(learning_rate=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(learning_rate=0.1, momentum=0.9, weight_decay=0.05),
    "clipnorm": dict(learning_rate=0.1, momentum=0.5, clipnorm=1.0),
    "clipvalue": dict(learning_rate=0.1, clipvalue=0.5),
    "global_clipnorm": dict(learning_rate=0.1, momentum=0.9, nesterov=True, global_clipnorm=1.0),
}


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_matches_keras3(keras: Any, case: str) -> None:
    kwargs = KERAS_CASES[case]
    init, grads = problem(seed=len(case))
    assert_same_trajectory(sgdgen_trajectory(kwargs, init, grads), keras_trajectory(keras, kwargs, init, grads),
                           f"Keras 3 SGD({kwargs})")


def test_matches_keras3_exponential_decay(keras: Any) -> None:
    init, grads = problem(seed=42)
    ours = sgdgen.frontend.schedules.ExponentialDecay(0.2, decay_steps=4, decay_rate=0.5)
    theirs = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=4, decay_rate=0.5)
    assert_same_trajectory(sgdgen_trajectory(dict(learning_rate=ours, momentum=0.9, weight_decay=0.05), init, grads),
                           keras_trajectory(keras, dict(learning_rate=theirs, momentum=0.9, weight_decay=0.05),
                                            init, grads),
                           "Keras 3 SGD(ExponentialDecay, momentum, weight_decay)")


def test_ema_after_one_step_differs_from_keras3_as_documented(keras: Any) -> None:
    """SEMANTICS §13: sgdgen (tf_keras) averages from the build-time weights; Keras 3 from w1."""
    init, grads = problem(seed=7)
    kwargs = dict(learning_rate=0.1, momentum=0.9, use_ema=True, ema_momentum=0.99)
    w0 = [np.array(x) for x in init]

    variables = [sgdgen.Variable(x, name=f"ema/w{i}") for i, x in enumerate(init)]
    opt = sgdgen.SGD(**kwargs)
    opt.apply_gradients(zip(grads[0], variables))
    w1 = [v.numpy() for v in variables]
    opt.finalize_variable_values(variables)
    ours = [v.numpy() for v in variables]

    kvars = [keras.Variable(x, dtype="float32") for x in init]
    kopt = keras.optimizers.SGD(**kwargs)
    kopt.apply_gradients(zip([jnp.asarray(g) for g in grads[0]], kvars))
    kw1 = [np.asarray(v.value) for v in kvars]
    kopt.finalize_variable_values(kvars)
    theirs = [np.asarray(v.value) for v in kvars]

    for a, b, c, d, e in zip(w0, w1, kw1, ours, theirs):
        np.testing.assert_allclose(b, c, rtol=RTOL, atol=RTOL * np.max(np.abs(c)))  # the same step
        want = np.float32(0.99) * a + np.float32(0.01) * b
        np.testing.assert_allclose(d, want, rtol=RTOL, atol=RTOL * np.max(np.abs(want)))  # sgdgen: 0.99*w0 + 0.01*w1
        np.testing.assert_array_equal(e, c)  # Keras 3: exactly w1
        assert np.max(np.abs(d - e)) > 1e-3  # and the two differ by far more than rounding


# ---- optax --------------------------------------------------------------------------------------

def _optax_cases() -> dict[str, tuple[dict[str, Any], Any]]:
    import optax

    return {
        "sgd": (dict(learning_rate=0.1), optax.sgd(0.1)),
        "momentum": (dict(learning_rate=0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
        "nesterov": (dict(learning_rate=0.1, momentum=0.9, nesterov=True),
                     optax.sgd(0.1, momentum=0.9, nesterov=True)),
        "clip_by_global_norm": (dict(learning_rate=0.1, global_clipnorm=1.0),
                                optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))),
        "clip": (dict(learning_rate=0.1, clipvalue=0.5), optax.chain(optax.clip(0.5), optax.sgd(0.1))),
        # coupled (optax) and decoupled (tf_keras) decay coincide only without momentum
        "add_decayed_weights": (dict(learning_rate=0.1, weight_decay=0.3),
                                optax.chain(optax.add_decayed_weights(0.3), optax.sgd(0.1))),
    }


@pytest.mark.parametrize("case", ["sgd", "momentum", "nesterov", "clip_by_global_norm", "clip",
                                  "add_decayed_weights"])
def test_matches_optax(case: str) -> None:
    kwargs, tx = _optax_cases()[case]
    init, grads = problem(seed=100 + len(case))
    assert_same_trajectory(sgdgen_trajectory(kwargs, init, grads), optax_trajectory(tx, init, grads),
                           f"optax {case}")
