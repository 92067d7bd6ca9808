"""sgdgen.keras.SGD inside Keras 3 (JAX backend): model.fit, keras.distribution, save/load, configs.

Tolerance: where two runs execute the same generated module on the same data they must be
bit-equal (the module is the same program); against Keras' own SGD, whose formulas coincide
for momentum, Nesterov and decoupled decay, docs/numerics.md §4's float32 bound,
1e-6 * max|weight| per run of a few steps (FMA contraction and op order only). Across device
counts (8 vs 1) the global norm's summation order may differ: same 1e-6 * scale bound.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported (conftest already set XLA_FLAGS)

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import sgdgen  # noqa: E402
from sgdgen.errors import ConfigError, StepInputError  # noqa: E402

keras = pytest.importorskip("keras")
ROOT = Path(__file__).resolve().parents[1]
ALL_OPTIONS = dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=0.5,
                   use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(private_xla_cache: Path) -> Path:
    return private_xla_cache


def _data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32)


def _model(seed: int = 1) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
                             keras.layers.Dense(4, name="out")])


def _fit(optimizer: Any, epochs: int = 2, model: Any = None, **kwargs: Any) -> Any:
    x, y = _data()
    model = model or _model()
    model.compile(optimizer=optimizer, loss="mse", **kwargs)
    model.fit(x, y, epochs=epochs, batch_size=8, shuffle=False, verbose=0)
    return model


def _close(a: list[np.ndarray], b: list[np.ndarray], tol: float = TOL) -> None:
    for wa, wb in zip(a, b):
        scale = max(float(np.abs(wb).max()), 1.0)
        np.testing.assert_allclose(wa, wb, rtol=0, atol=tol * scale)


def test_fit_matches_keras_sgd_where_the_rules_coincide() -> None:
    options = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours, theirs = _fit(sgdgen.keras.SGD(**options)), _fit(keras.optimizers.SGD(**options))
    _close(ours.get_weights(), theirs.get_weights())
    assert int(ours.optimizer.iterations.numpy()) == 8
    plain = _fit(sgdgen.keras.SGD(0.1))  # the same model moved by a different rule must differ
    assert not np.allclose(plain.get_weights()[0], ours.get_weights()[0], atol=1e-4)


def _grads(variables: list[Any], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(v.shape).astype(np.float32) for v in variables]


def test_apply_gradients_is_the_generated_step_for_every_option() -> None:
    """A custom loop with apply_gradients equals sgdgen.jax_step fed the same gradients, bit for
    bit: EMA starting as a copy, its overwrite, the biases excluded from decay, the clip."""
    model = _model()
    opt = sgdgen.keras.SGD(**ALL_OPTIONS)
    opt.exclude_from_weight_decay(var_names=["bias"])
    variables = model.trainable_variables
    params = {v.path: np.asarray(v.value) for v in variables}
    step = sgdgen.jax_step(ALL_OPTIONS, params, exclude_from_weight_decay=["bias"])
    state = step.init(params)
    for k in range(5):
        grads = _grads(variables, k)
        opt.apply_gradients(zip(grads, variables))
        params, state = step(params, {v.path: g for v, g in zip(variables, grads)}, state, lr=0.05)
    for v in variables:
        np.testing.assert_array_equal(np.asarray(v.value), np.asarray(params[v.path]))
    order = jax.tree_util.tree_leaves({v.path: i for i, v in enumerate(variables)})
    for k, i in enumerate(order):
        np.testing.assert_array_equal(np.asarray(opt.averages[i].value), np.asarray(state.averages[k]))
        np.testing.assert_array_equal(np.asarray(opt.momenta[i].value), np.asarray(state.momenta[k]))
    assert int(opt.iterations.numpy()) == 5


def test_train_step_is_one_xla_program_with_the_step_inside() -> None:
    model = _fit(sgdgen.keras.SGD(**ALL_OPTIONS), epochs=1)
    state = (model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
             model.metrics_variables)
    state = jax.tree_util.tree_map(lambda v: v.value, state)
    x, y = _data(8)
    lowered = jax.jit(model.train_step).lower(state, (x, y, None))
    assert "sgdgen_step" in lowered.as_text()  # the generated module is called from Keras' step
    assert lowered.compile().as_text().count("HloModule") == 1


def _count_compiles(fn: Any) -> int:
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_changing_the_learning_rate_between_epochs_does_not_recompile() -> None:
    """A second fit compiles nothing, with or without `learning_rate = 0` before it (Keras' own
    SGD: 0 as well). On one device the step adds no sharding constraint, so Keras' metrics and
    learning rate keep their plain single-device sharding from fit to fit."""
    x, y = _data()
    counts = []
    for change in (False, True):
        model = _fit(sgdgen.keras.SGD(0.1, momentum=0.9), epochs=1)
        before = [w.copy() for w in model.get_weights()]
        if change:
            model.optimizer.learning_rate = 0.0
        counts.append(_count_compiles(lambda: model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)))
    assert counts == [0, 0]
    moved = model.get_weights()  # lr 0: only the momentum moves the weights, so they still change
    assert float(model.optimizer.learning_rate.numpy()) == 0.0 and not np.array_equal(before[0], moved[0])


def test_callbacks_read_iterations_and_learning_rate_and_a_scheduler_sets_it() -> None:
    seen: list[tuple[int, float]] = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            opt = self.model.optimizer
            seen.append((int(opt.iterations.numpy()), float(np.asarray(opt.learning_rate))))

    x, y = _data()
    model = _model()
    model.compile(optimizer=sgdgen.keras.SGD(0.1), loss="mse")
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[scheduler, Probe()])
    assert [s[0] for s in seen] == [4, 8, 12]
    np.testing.assert_allclose([s[1] for s in seen], np.float32([0.1, 0.05, 0.1 / 3]), rtol=1e-7)


def test_run_eagerly_equals_the_jitted_fit() -> None:
    jitted = _fit(sgdgen.keras.SGD(**ALL_OPTIONS))
    eager = _fit(sgdgen.keras.SGD(**ALL_OPTIONS), run_eagerly=True)
    _close(eager.get_weights(), jitted.get_weights())


def test_a_schedule_is_computed_in_the_program_and_keras_reports_it() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    model = _fit(sgdgen.keras.SGD(schedule, momentum=0.5))
    theirs = _fit(keras.optimizers.SGD(schedule, momentum=0.5))
    _close(model.get_weights(), theirs.get_weights())
    opt = model.optimizer
    assert isinstance(opt.sgd_config.learning_rate, sgdgen.schedules.ExponentialDecay)
    np.testing.assert_allclose(float(opt.learning_rate), 0.1 * 0.5 ** (8 / 2), rtol=1e-6)


@pytest.mark.parametrize("options", [
    dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-2),
    # EMA: each fit ends with Keras' overwrite of the weights by their averages; a later fit
    # must not donate a buffer the weight shares with its average (it once failed so)
    dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-2, use_ema=True, ema_momentum=0.9),
], ids=["plain", "ema"])
def test_save_load_then_fit_continues_where_it_stopped(tmp_path: Path, options: dict) -> None:
    x, y = _data()
    straight = _fit(sgdgen.keras.SGD(**options), epochs=2)  # two fits: EMA overwrites at the end of each
    straight.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    first = _fit(sgdgen.keras.SGD(**options), epochs=2)
    path = tmp_path / "model.keras"
    first.save(path)
    loaded = keras.models.load_model(path, custom_objects={"SGD": sgdgen.keras.SGD})
    assert isinstance(loaded.optimizer, sgdgen.keras.SGD) and int(loaded.optimizer.iterations.numpy()) == 8
    for a, b in zip(loaded.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    loaded.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.optimizer.variables, straight.optimizer.variables):  # slots and averages too
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


def test_get_config_is_keras3s_and_round_trips() -> None:
    opt = sgdgen.keras.SGD(0.1, momentum=0.9, nesterov=True, clipvalue=1.0, clipnorm=2.0, use_ema=True,
                           ema_overwrite_frequency=5)
    config = opt.get_config()
    assert config["loss_scale_factor"] is None and config["gradient_accumulation_steps"] is None
    assert (config["momentum"], config["nesterov"], config["clipnorm"], config["clipvalue"]) == (0.9, True, 2.0, 1.0)
    again = sgdgen.keras.SGD.from_config(config)
    assert again.sgd_config == opt.sgd_config and again.get_config() == config
    keras_config = keras.optimizers.SGD(0.1, momentum=0.9).get_config()  # a Keras 3 SGD's keys are accepted
    assert sgdgen.keras.SGD.from_config(keras_config).sgd_config.momentum == 0.9
    legacy = sgdgen.SGD(0.1, momentum=0.5).get_config()  # tf_keras' keys too (is_legacy_optimizer, jit_compile)
    assert sgdgen.keras.SGD.from_config(legacy).sgd_config.momentum == 0.5
    sched = sgdgen.keras.SGD(sgdgen.schedules.CosineDecay(0.1, 10)).get_config()
    assert sgdgen.keras.SGD.from_config(sched).sgd_config.learning_rate == sgdgen.schedules.CosineDecay(0.1, 10)


@pytest.mark.parametrize("key, value, message", [
    ("loss_scale_factor", 128.0, "loss_scale_factor=128.0 is not supported.*pass loss_scale_factor=None"),
    ("gradient_accumulation_steps", 4, "gradient_accumulation_steps=4 is not supported.*optax.MultiSteps"),
])
def test_keras3_only_options_are_refused_with_what_is_supported(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sgdgen.keras.SGD(0.1, **{key: value})
    config = sgdgen.keras.SGD(0.1).get_config()
    with pytest.raises(ConfigError, match=message):
        sgdgen.keras.SGD.from_config({**config, key: value})


def test_tf_keras_validation_and_partial_gradients_are_refused() -> None:
    with pytest.raises(ValueError, match="At most one of `clipnorm` and `global_clipnorm`"):
        sgdgen.keras.SGD(clipnorm=1.0, global_clipnorm=1.0)
    with pytest.raises(ValueError, match="decay"):
        sgdgen.keras.SGD(decay=0.1)
    model = _model()
    opt = sgdgen.keras.SGD(0.1, momentum=0.9)
    variables = model.trainable_variables
    opt.build(variables)
    before = [np.asarray(v.value).copy() for v in opt.variables]
    with pytest.raises(StepInputError, match=re.escape(variables[1].path)):
        opt.apply_gradients([(g, v) for g, v in zip(_grads(variables, 0), variables) if v is not variables[1]])
    for b, v in zip(before, opt.variables):  # a refused call changes no state
        np.testing.assert_array_equal(b, np.asarray(v.value))


def test_slots_take_the_variables_layouts() -> None:
    devices = keras.distribution.list_devices()[:8]
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*kernel"] = (None, "model")
    with keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope():
        model = _model()
        opt = sgdgen.keras.SGD(**ALL_OPTIONS)
        opt.build(model.trainable_variables)
    for i, v in enumerate(model.trainable_variables):
        for slot in (opt.momenta[i], opt.averages[i]):
            assert slot.value.sharding.is_equivalent_to(v.value.sharding, len(v.shape))
    assert opt.step.program.mesh.size == 8
    assert opt.step.program.variables[0].layout.sharding_specs[-1] in ("model", "unsharded")


def _distributed_fit(distribution: Any) -> list[np.ndarray]:
    with distribution.scope():
        model = _fit(sgdgen.keras.SGD(**ALL_OPTIONS), epochs=2)
        return model.get_weights()


def test_data_and_model_parallel_match_one_device() -> None:
    one = _fit(sgdgen.keras.SGD(**ALL_OPTIONS), epochs=2).get_weights()
    devices = keras.distribution.list_devices()[:8]
    data = keras.distribution.DataParallel(devices=devices)
    _close(_distributed_fit(data), one)
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*kernel"] = (None, "model")
    _close(_distributed_fit(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")), one)


def test_import_sgdgen_does_not_import_keras() -> None:
    code = "import sys, sgdgen; assert 'keras' not in sys.modules and 'optax' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


README_MARKER = "<!-- readme-example: keras3"


def test_readme_keras3_example_runs_as_written() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index(README_MARKER)
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert m and text[start:m.start()].count("\n") <= 1, "the marker must sit right above the python block"
    scope: dict = {}
    exec(compile(m.group(1), "README.md:keras3", "exec"), scope)
    model = scope["model"]
    assert isinstance(model.optimizer, sgdgen.keras.SGD) and int(model.optimizer.iterations.numpy()) > 0
    assert scope["history"].history["loss"][-1] < scope["history"].history["loss"][0]
