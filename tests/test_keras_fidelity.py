"""Keras API fidelity (issue 9): what code written for tf_keras 2.21 expects of `sgdgen.SGD`.

Each test ports a tf_keras behaviour (tf_keras/optimizers/optimizer.py, optimizer_test.py,
schedules/learning_rate_schedule.py at v2.21.0; cited per test) to sgdgen's API. Expected
values come from the NumPy oracle `sgdgen.reference` (SEMANTICS decision 10: float32 within
rtol 1e-6 of max|ref|) or, where tf_keras' test states a number, from the arithmetic that
gives it. A call that raises must change nothing (decision 15): checked bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sgdgen
from sgdgen import reference
from sgdgen.frontend import schedules as S
from sgdgen.frontend.config import SGDConfig

RTOL = 1e-6  # SEMANTICS decision 10 (float32; XLA may contract into FMAs)


@pytest.fixture(scope="module", autouse=True)
def _private_compilation_cache(private_xla_cache: Path) -> Path:
    return private_xla_cache


def close(actual: Any, want: Any) -> None:
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(actual), want, rtol=RTOL, atol=RTOL * max(1.0, float(np.max(np.abs(want)))))


def state(opt: sgdgen.SGD, variables: list[sgdgen.Variable]) -> list[bytes]:
    """Every array the optimizer and the variables hold, bit for bit, plus the variable count."""
    return [*(v.numpy().tobytes() for v in [*variables, *opt.variables]), bytes([len(opt.variables)])]


def run_reference(config: SGDConfig, init: list[np.ndarray], grads: list[list[np.ndarray]]) -> reference.RefState:
    ref = reference.build(config, init)
    for g in grads:
        ref = reference.apply_gradients(config, ref, g)
    return ref


# ---- 1. variables keyed by identity, not by name ----------------------------------------

def test_unnamed_and_same_named_variables_step_together() -> None:
    """tf_keras `_var_key` is `variable._unique_id` (OPT:161-166): any number of variables may
    be called "Variable"; each gets its own slot, named after it."""
    init = [np.array([1.0, 2.0], np.float32), np.array([3.0, -1.0], np.float32), np.array(0.5, np.float32)]
    variables = [sgdgen.Variable(init[0]), sgdgen.Variable(init[1]), sgdgen.Variable(init[2], name="Variable")]
    opt = sgdgen.SGD(0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(np.shape(x)).astype(np.float32) for x in init] for _ in range(3)]
    for g in grads:
        opt.apply_gradients(zip(g, variables))
    ref = run_reference(opt.config, init, grads)
    for v, want in zip(variables, ref.variables):
        close(v.numpy(), want)
    assert [v.name for v in opt.variables] == ["iteration:0"] + ["SGD/m/Variable:0"] * 3
    for m, want in zip(opt.variables[1:], ref.momenta):
        close(m.numpy(), want)


def test_program_names_are_unique_and_deterministic() -> None:
    """The program's variable names (ABI slot names, artifact manifest) are the user's names,
    with a repeat given the first free `_k` suffix: a function of the list alone."""
    a, b, c = sgdgen.Variable(1.0), sgdgen.Variable(2.0, name="Variable_1"), sgdgen.Variable(3.0)
    opt = sgdgen.SGD(0.1)
    names = [s.name for s in opt._program([a, b, c], opt.config, [True] * 3).variables]
    assert names == ["Variable", "Variable_1", "Variable_2"]
    other = sgdgen.SGD(0.1)
    again = [s.name for s in other._program([sgdgen.Variable(4.0), sgdgen.Variable(5.0, name="Variable_1"),
                                             sgdgen.Variable(6.0)], other.config, [True] * 3).variables]
    assert again == names


def test_same_named_variables_round_trip_an_artifact(tmp_path: Path) -> None:
    init = [np.array([1.0, 2.0], np.float32), np.array([4.0, 8.0], np.float32)]
    variables = [sgdgen.Variable(x) for x in init]
    opt = sgdgen.SGD(0.5)
    opt.build(variables)
    opt.save_artifact(tmp_path / "art")
    fresh = [sgdgen.Variable(x) for x in init]
    loaded = sgdgen.SGD.load_artifact(tmp_path / "art", fresh)
    g = [np.ones(2, np.float32), np.full(2, 2.0, np.float32)]
    loaded.apply_gradients(zip(g, fresh))
    ref = run_reference(loaded.config, init, [g])
    for v, want in zip(fresh, ref.variables):
        close(v.numpy(), want)


def test_generator_errors_are_raised_before_build() -> None:
    """A call the generator refuses (global_clipnorm over two dtypes) changes nothing: not even
    the slots that `build` would create."""
    variables = [sgdgen.Variable(np.ones(2, np.float32)), sgdgen.Variable(np.ones(2, np.float16))]
    opt = sgdgen.SGD(0.1, global_clipnorm=1.0)
    before = state(opt, variables)
    with pytest.raises(ValueError, match="global_clipnorm"):
        opt.apply_gradients(zip([np.ones(2, np.float32), np.ones(2, np.float16)], variables))
    assert state(opt, variables) == before and not opt._built


# ---- 2. non-scalar losses ------------------------------------------------------------------

def test_non_scalar_loss_is_summed_as_gradient_tape_does() -> None:
    """tf_keras optimizer_test `testComputeGradients`: the loss `lambda: x` of a vector x has
    gradient ones (GradientTape differentiates the sum of a non-scalar target)."""
    x = sgdgen.Variable(np.array([1.0, 2.0], np.float32))
    opt = sgdgen.SGD(0.1)
    (g, v), = opt.compute_gradients(lambda: x, [x])
    assert v is x and np.asarray(g).tolist() == [1.0, 1.0]
    (g, _), = opt.compute_gradients(lambda: x * 2.0, [x])
    assert np.asarray(g).tolist() == [2.0, 2.0]
    opt.minimize(lambda: x * 2.0, [x])
    ref = run_reference(opt.config, [np.array([1.0, 2.0], np.float32)], [[np.full(2, 2.0, np.float32)]])
    close(x.numpy(), ref.variables[0])


# ---- 3. loss() before a callable var_list --------------------------------------------------

def test_callable_var_list_is_called_after_the_loss() -> None:
    """tf_keras `compute_gradients` (OPT:269-276) calls `loss()` and then `var_list()`, so a
    variable the first call of the loss creates is differentiated (optimizer_test
    `testComputeGradients`, second half)."""
    created: list[sgdgen.Variable] = []
    calls: list[str] = []

    def loss() -> Any:
        calls.append("loss")
        if not created:
            created.append(sgdgen.Variable(np.array([1.0, 2.0], np.float32)))
        return created[0] * 3.0

    def var_list() -> list[sgdgen.Variable]:
        calls.append("var_list")
        return list(created)

    opt = sgdgen.SGD(0.1)
    (g, v), = opt.compute_gradients(loss, var_list)
    assert calls[:2] == ["loss", "var_list"] and v is created[0]
    assert np.asarray(g).tolist() == [3.0, 3.0]


# ---- 4. constraints ------------------------------------------------------------------------

def nonneg(w: Any) -> Any:
    """Keras' NonNeg constraint: `w * cast(w >= 0, w.dtype)`."""
    return w * (w >= 0).astype(w.dtype)


@pytest.mark.parametrize("mesh", [sgdgen.Mesh(()), sgdgen.Mesh({"batch": 2, "model": 4})])
def test_constraint_applied_after_each_step(mesh: sgdgen.Mesh) -> None:
    """tf_keras optimizer_test `testVariableConstraints` (a NonNeg kernel of -999999 with zero
    gradients becomes 0) and OPT:733-736: the constraint runs after the step, on its result."""
    layout = sgdgen.Layout(["model"] if mesh.size > 1 else ["unsharded"], mesh)
    w = sgdgen.Variable(np.array([-999999.0, 1.0, -0.5, 2.0], np.float32), layout=layout, constraint=nonneg)
    b = sgdgen.Variable(np.zeros(4, np.float32), layout=layout)
    opt = sgdgen.SGD(0.1, mesh=mesh)
    opt.apply_gradients(zip([np.zeros(4, np.float32), np.ones(4, np.float32)], [w, b]))
    assert w.numpy().tolist() == [0.0, 1.0, 0.0, 2.0]
    close(b.numpy(), np.full(4, -0.1, np.float32))  # an unconstrained variable may go negative
    assert w.value.sharding.is_equivalent_to(layout.named_sharding(), 1)
    g = np.array([0.0, 20.0, 0.0, -1.0], np.float32)
    opt.apply_gradients(zip([g, np.zeros(4, np.float32)], [w, b]))
    want = np.maximum(np.array([0.0, 1.0, 0.0, 2.0], np.float32) - np.float32(0.1) * g, 0)
    close(w.numpy(), want)


def test_constraint_runs_after_the_ema_as_in_tf_keras() -> None:
    """The EMA is part of `_internal_apply_gradients`; the constraint comes after it, so the
    average sees the unconstrained weight: w = 2 - 1*3 = -1, avg = 0.5*2 + 0.5*(-1) = 0.5."""
    w = sgdgen.Variable(np.array(2.0, np.float32), constraint=nonneg)
    opt = sgdgen.SGD(1.0, use_ema=True, ema_momentum=0.5)
    opt.apply_gradients([(np.float32(3.0), w)])
    ref = run_reference(opt.config, [np.array(2.0, np.float32)], [[np.array(3.0, np.float32)]])
    close(opt.variables[1].numpy(), ref.averages[0])
    assert float(ref.variables[0]) < 0 and w.numpy() == nonneg(ref.variables[0])


def test_bad_constraint_fails_before_the_step() -> None:
    w = sgdgen.Variable(np.ones(3, np.float32), name="kernel", constraint=lambda x: x[:2])
    opt = sgdgen.SGD(0.1)
    before = state(opt, [w])
    with pytest.raises(ValueError, match=r"constraint of variable 'kernel:0' returns shape \[2\].*keep the shape"):
        opt.apply_gradients([(np.ones(3, np.float32), w)])
    assert state(opt, [w]) == before
    with pytest.raises(TypeError, match="`constraint` must be a callable"):
        sgdgen.Variable(1.0, constraint="NonNeg")


# ---- 5. slot names and add_variable_from_reference ------------------------------------------

def test_apply_gradients_name_scopes_the_slots() -> None:
    """tf_keras optimizer_test `testApplyGradientsNameArg`: `apply_gradients(..., name="dummy")`
    builds inside `name_scope("dummy")`, so the slots are "dummy/m/..."."""
    variables = [sgdgen.Variable(2.0), sgdgen.Variable(2.0, name="dense/bias")]
    opt = sgdgen.SGD(0.1, use_ema=True)
    opt.apply_gradients(zip([np.float32(1.0), np.float32(1.0)], variables), name="dummy")
    assert [v.name for v in opt.variables] == ["iteration:0", "dummy/average/Variable:0",
                                               "dummy/average/dense/bias:0", "dummy/m/Variable:0",
                                               "dummy/m/dense/bias:0"]


def test_add_variable_from_reference_as_tf_keras() -> None:
    """optimizer_test `testAddVariableFromReference` ("test/tmp", zeros) and
    `testAddVarialeWithCustomShape` (shape=[] gives a scalar 0); `initial_value` is used as
    given; each is added to `variables` (OPT:476-541)."""
    opt = sgdgen.SGD()
    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    tmp = sgdgen.Variable(np.array([1.0, 2.0], np.float32), name="tmp", layout=sgdgen.Layout(["batch"], mesh))
    v = opt.add_variable_from_reference(tmp, "test")
    assert v._shared_name == "test/tmp" and v.numpy().tolist() == [0.0, 0.0] and v.layout == tmp.layout
    s = opt.add_variable_from_reference(tmp, "test", shape=[])
    assert s.shape == () and s.numpy() == 0.0 and s.dtype == np.float32 and s.layout.sharding_specs == []
    i = opt.add_variable_from_reference(tmp, "init", initial_value=np.array([5.0, 6.0]))
    assert i.numpy().tolist() == [5.0, 6.0] and i.dtype == np.float32
    assert opt.variables[1:] == [v, s, i]
    with pytest.raises(ValueError, match=r"initial_value has shape \[3\], expected \[2\]"):
        opt.add_variable_from_reference(tmp, "bad", initial_value=np.zeros(3))
    assert opt.variables[1:] == [v, s, i]


# ---- 6. set_weights before build -------------------------------------------------------------

def test_set_weights_before_build_raises_tf_keras_error() -> None:
    """optimizer_test `testSetWeights` (OPT:873-879)."""
    x = sgdgen.Variable(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    opt1 = sgdgen.SGD(0.1, momentum=0.9)
    opt1.apply_gradients([(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), x)])
    opt2 = sgdgen.SGD(0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"You are calling `set_weights\(\)` on an optimizer that has not yet been "
                                         r"built.*optimizer.build\(trainable_variables\)"):
        opt2.set_weights(opt1.get_weights())
    assert len(opt2.variables) == 1 and not opt2._built
    opt2.build([x])
    opt2.set_weights(opt1.get_weights())
    assert [w.tobytes() for w in opt2.get_weights()] == [w.tobytes() for w in opt1.get_weights()]


# ---- 7. assigning a schedule -----------------------------------------------------------------

def test_schedule_assigned_to_a_float_optimizer_is_followed() -> None:
    """optimizer_test `testSetLearningRate`: a schedule may replace a float rate (and another
    schedule); a float may not replace a schedule (TypeError "This optimizer was created with")."""
    init = np.array([1.0, -2.0], np.float32)
    x = sgdgen.Variable(init)
    opt = sgdgen.SGD(learning_rate=1.0, momentum=0.5)
    g = np.array([1.0, 2.0], np.float32)
    opt.apply_gradients([(g, x)])
    sched = S.ExponentialDecay(initial_learning_rate=1e-2, decay_steps=10000, decay_rate=0.9)
    opt.learning_rate = sched
    assert opt.learning_rate == sched(1)
    for _ in range(2):
        opt.apply_gradients([(g, x)])
    assert 0.00999 < opt.learning_rate < 0.01
    ref = reference.build(opt.config, [init])
    ref = reference.apply_gradients(SGDConfig.create(1.0, momentum=0.5), ref, [g])
    for _ in range(2):
        ref = reference.apply_gradients(opt.config, ref, [g])
    close(x.numpy(), ref.variables[0])
    opt.learning_rate = S.ExponentialDecay(initial_learning_rate=1e-2, decay_steps=10000, decay_rate=0.9)
    before = opt.get_config()
    with pytest.raises(TypeError, match="This optimizer was created with a `LearningRateSchedule`"):
        opt.learning_rate = 2.0
    assert opt.get_config() == before


# ---- 8. an int32 iterations counter ------------------------------------------------------------

def test_int32_iterations_counter() -> None:
    """optimizer_test `testSetIterations`: an int32 counter set to 2 reads 3 after one step,
    stays int32, and cannot be replaced after build."""
    opt = sgdgen.SGD(learning_rate=S.PiecewiseConstantDecay([2], [1.0, 0.5]))
    opt.iterations = sgdgen.Variable(np.int32(2), dtype=np.int32)
    assert opt.iterations.numpy() == 2 and opt.learning_rate == np.float32(1.0)
    variables = [sgdgen.Variable(2.0), sgdgen.Variable(2.0)]
    iterations = opt.apply_gradients(zip([np.float32(1.0), np.float32(1.0)], variables))
    assert iterations is opt.iterations and iterations.numpy() == 3 and iterations.dtype == np.int32
    assert [v.numpy() for v in variables] == [np.float32(1.0)] * 2  # schedule at step 2: 1.0
    opt.apply_gradients(zip([np.float32(1.0), np.float32(1.0)], variables))  # step 3: 0.5
    assert iterations.numpy() == 4 and [v.numpy() for v in variables] == [np.float32(0.5)] * 2
    with pytest.raises(RuntimeError, match="Cannot set"):
        opt.iterations = sgdgen.Variable(np.int32(2), dtype=np.int32)
    with pytest.raises(TypeError, match="scalar int64 or int32"):
        sgdgen.SGD().iterations = sgdgen.Variable(np.float32(2))


def test_int32_iterations_wraps_as_tf_does() -> None:
    """TF's int32 `assign_add` wraps: 2**31 - 1 + 1 = -2**31 (documented in README)."""
    opt = sgdgen.SGD(0.1)
    top = np.iinfo(np.int32).max
    opt.iterations = sgdgen.Variable(np.int32(top), dtype=np.int32)
    opt.apply_gradients([(np.float32(1.0), sgdgen.Variable(1.0))])
    assert opt.iterations.numpy() == np.int32(top).astype(np.int64) + 1 - 2**32


# ---- 9. schedule argument validation as tf_keras ------------------------------------------------

def test_warmup_only_cosine_decay_is_accepted_as_in_tf_keras() -> None:
    """tf_keras CosineDecay (LRS:664-760) checks nothing: decay_steps=0 with a warmup is a
    warmup-only schedule; after the warmup TF computes 0/0, NaN, and so does sgdgen."""
    sched = S.CosineDecay(0.0, decay_steps=0, warmup_target=1.0, warmup_steps=4)
    values = [sched(k) for k in range(6)]
    assert values[:4] == [np.float32(k) / np.float32(4) for k in range(4)]
    assert all(math.isnan(v) for v in values[4:])
    x = sgdgen.Variable(np.array([1.0], np.float32))
    opt = sgdgen.SGD(sched)
    grads = [[np.ones(1, np.float32)] for _ in range(3)]
    for g in grads:
        opt.apply_gradients([(g[0], x)])
    close(x.numpy(), run_reference(opt.config, [np.array([1.0], np.float32)], grads).variables[0])


@pytest.mark.parametrize("make", [
    lambda: S.ExponentialDecay(0.1, 0, 0.5),
    lambda: S.ExponentialDecay(0.1, -3, 0.5),
    lambda: S.InverseTimeDecay(0.1, 0.0, 0.5),
    lambda: S.PolynomialDecay(0.1, 0),
    lambda: S.CosineDecay(0.1, 0),
    lambda: S.CosineDecayRestarts(0.1, 0),
    lambda: S.CosineDecayRestarts(0.1, 10, t_mul=0.0),
    lambda: S.CosineDecay(0.1, 10, warmup_target=1.0, warmup_steps=-1),
])
def test_degenerate_schedule_arguments_are_accepted_and_computed(make: Any) -> None:
    """tf_keras validates only PiecewiseConstantDecay's list lengths; the others take any
    number and give TF's float32 results. The compiled step computes the same value as the
    host schedule (NaN where it is NaN) at each of the first steps."""
    sched = make()
    x = sgdgen.Variable(np.zeros(1, np.float32))
    opt = sgdgen.SGD(sched)
    for k in range(3):
        before = x.numpy()
        opt.apply_gradients([(np.ones(1, np.float32), x)])
        lr = sched(k)
        got = float(before[0] - x.numpy()[0])  # lr * 1
        assert (math.isnan(got) and math.isnan(lr)) or got == pytest.approx(float(lr), rel=1e-6, abs=0), (k, got, lr)
        if math.isnan(got):
            break


def test_piecewise_constant_decay_length_message_is_tf_keras() -> None:
    with pytest.raises(ValueError, match=r"The length of boundaries should be 1 less than the length of values"):
        S.PiecewiseConstantDecay([1, 2], [0.1, 0.2])


# ---- 10. a custom schedule ----------------------------------------------------------------------

class CustomLRSchedule(S.LearningRateSchedule):
    """optimizer_test `testGetAndFromConfig`'s schedule: initial / (step + 1)."""

    def __init__(self, initial_learning_rate: float):
        self.initial_learning_rate = initial_learning_rate

    def __call__(self, step: Any) -> Any:
        return np.float32(self.initial_learning_rate) / (np.float32(step) + np.float32(1))

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate}


def test_custom_schedule_is_evaluated_on_the_host_each_step() -> None:
    init = [np.array([1.0, 2.0], np.float32)]
    x = sgdgen.Variable(init[0])
    opt = sgdgen.SGD(CustomLRSchedule(0.05), momentum=0.9)
    assert opt.learning_rate == np.float32(0.05)
    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal(2).astype(np.float32)] for _ in range(4)]
    for g in grads:
        opt.apply_gradients([(g[0], x)])
    close(x.numpy(), run_reference(opt.config, init, grads).variables[0])
    assert opt.learning_rate == np.float32(0.05) / np.float32(5)


def test_custom_schedule_config_round_trips_through_custom_objects() -> None:
    """`get_config` serializes it as tf_keras does (module None, registered_name the class);
    `from_config(config, custom_objects=...)` rebuilds it; JSON in between."""
    opt = sgdgen.SGD(CustomLRSchedule(0.05), momentum=0.5, clipnorm=0.5, use_ema=True, ema_momentum=0.5,
                     ema_overwrite_frequency=50, name="custom_sgd")
    config = opt.get_config()
    assert config["learning_rate"] == {"module": None, "class_name": "CustomLRSchedule",
                                       "config": {"initial_learning_rate": 0.05},
                                       "registered_name": "CustomLRSchedule"}
    restored = sgdgen.SGD.from_config(json.loads(json.dumps(config)),
                                      custom_objects={"CustomLRSchedule": CustomLRSchedule})
    assert isinstance(restored.config.learning_rate, CustomLRSchedule)
    assert restored.get_config() == config
    with pytest.raises(ValueError, match=r"class_name='CustomLRSchedule'.*custom_objects"):
        sgdgen.SGD.from_config(config)


def test_broken_custom_schedule_fails_at_construction() -> None:
    """tf_keras evaluates a schedule at construction (`_build_learning_rate`, OPT:382-392)."""

    class Unfinished(S.LearningRateSchedule):
        pass

    class Vector(S.LearningRateSchedule):
        def __call__(self, step: Any) -> Any:
            return np.ones(2)

    with pytest.raises(NotImplementedError, match="must override `__call__"):
        sgdgen.SGD(Unfinished())
    with pytest.raises(ValueError, match=r"schedule Vector\(0\) returned .*real scalar"):
        sgdgen.SGD(Vector())
    opt = sgdgen.SGD(0.1)
    with pytest.raises(ValueError, match="real scalar"):
        opt.learning_rate = Vector()
    assert opt.learning_rate == np.float32(0.1)


def test_custom_schedule_cannot_be_saved_as_an_artifact(tmp_path: Path) -> None:
    x = sgdgen.Variable(1.0)
    opt = sgdgen.SGD(CustomLRSchedule(0.05))
    opt.build([x])
    with pytest.raises(ValueError, match="CustomLRSchedule is evaluated on the host"):
        opt.save_artifact(tmp_path / "art")
    assert not (tmp_path / "art").exists()
