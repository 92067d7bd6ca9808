"""sgdgen.frontend.schedules: tf_keras schedule values in float32, validation, (de)serialization."""

import inspect
import json
import math

import numpy as np
import pytest

from sgdgen.frontend import schedules as S

f32 = np.float32


def ulps(a, b):
    """Distance in float32 ulps between two float32 values."""
    ia = np.array(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.array(b, np.float32).view(np.int32).astype(np.int64)
    return abs(int(ia) - int(ib))


# ---------------------------------------------------------------- ExponentialDecay


@pytest.mark.parametrize("step", [0, 1, 5, 10, 100])
def test_exponential_decay_matches_float32_formula(step):
    sched = S.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.7)
    p = f32(step) / f32(10)
    expected = f32(0.1) * np.power(f32(0.7), p)
    got = sched(step)
    assert type(got) is np.float32
    assert got == expected
    assert math.isclose(float(got), 0.1 * 0.7 ** (step / 10), rel_tol=1e-6)


@pytest.mark.parametrize("step,exponent", [(0, 0), (9, 0), (10, 1), (19, 1), (25, 2), (100, 10)])
def test_exponential_decay_staircase_floors(step, exponent):
    sched = S.ExponentialDecay(1.0, decay_steps=10, decay_rate=0.5, staircase=True)
    assert sched(step) == f32(0.5**exponent)


def test_exponential_decay_known_values():
    sched = S.ExponentialDecay(0.1, 10, 0.5)
    assert sched(10) == f32(0.05)
    assert sched(20) == f32(0.025)
    # the step is cast to float32 first: 2**24 + 1 rounds to 2**24
    big = S.ExponentialDecay(1.0, 2**24, 0.5)
    assert big(2**24 + 1) == f32(0.5)


# ---------------------------------------------------------------- PiecewiseConstantDecay


@pytest.mark.parametrize(
    "step,value",
    [(0, 1.0), (9, 1.0), (10, 1.0), (11, 0.5), (19, 0.5), (20, 0.5), (21, 0.1), (10**9, 0.1)],
)
def test_piecewise_constant_right_edge_inclusive(step, value):
    sched = S.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])
    got = sched(step)
    assert type(got) is np.float32
    assert got == f32(value)


def test_piecewise_constant_truncates_float_boundaries():
    sched = S.PiecewiseConstantDecay([10.9, 20.5], [1.0, 0.5, 0.1])
    assert sched(10) == f32(1.0)
    assert sched(11) == f32(0.5)  # 10.9 -> 10, so 11 is past the first boundary
    assert sched(20) == f32(0.5)
    assert sched(21) == f32(0.1)
    assert sched.boundaries == [10.9, 20.5]  # the config keeps what was given


def test_piecewise_constant_values_are_float32():
    sched = S.PiecewiseConstantDecay([5], [0.1, 1])
    assert sched(0) == f32(0.1) and float(sched(0)) == 0.10000000149011612
    assert sched(6) == f32(1.0)


def test_piecewise_constant_validation():
    with pytest.raises(ValueError, match=r"boundaries=\[1, 2\] of length 2, and values=\[1.0, 2.0\] of length 2"):
        S.PiecewiseConstantDecay([1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="`boundaries` must not be empty"):
        S.PiecewiseConstantDecay([], [1.0])
    with pytest.raises(ValueError, match=r"`boundaries` must be increasing.*boundaries=\[5, 3\]"):
        S.PiecewiseConstantDecay([5, 3], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="`values` must be a real number. Received: values='a'"):
        S.PiecewiseConstantDecay([5], [1.0, "a"])
    with pytest.raises(ValueError, match="`boundaries` must be a list"):
        S.PiecewiseConstantDecay(5, [1.0, 2.0])


# ---------------------------------------------------------------- PolynomialDecay


def poly_f32(init, end, decay_steps, power, step, cycle):
    s, ds = f32(step), f32(decay_steps)
    if cycle:
        ds = ds * (f32(1) if step == 0 else np.ceil(s / ds))
    else:
        s = min(s, ds)
    return (f32(init) - f32(end)) * np.power(f32(1) - s / ds, f32(power)) + f32(end)


@pytest.mark.parametrize("step", [0, 1, 3, 10, 11, 25, 1000])
@pytest.mark.parametrize("cycle", [False, True])
def test_polynomial_decay_matches_formula(step, cycle):
    sched = S.PolynomialDecay(0.1, 10, end_learning_rate=0.01, power=0.5, cycle=cycle)
    assert sched(step) == poly_f32(0.1, 0.01, 10, 0.5, step, cycle)


def test_polynomial_decay_clamps_and_cycles():
    plain = S.PolynomialDecay(1.0, 10, end_learning_rate=0.0, power=1.0)
    cyc = S.PolynomialDecay(1.0, 10, end_learning_rate=0.0, power=1.0, cycle=True)
    assert plain(0) == cyc(0) == f32(1.0)  # step 0 uses multiplier 1, not ceil(0) = 0
    assert plain(5) == cyc(5) == f32(0.5)
    assert plain(10) == cyc(10) == f32(0.0)
    assert plain(15) == f32(0.0)  # clamped at decay_steps
    assert cyc(15) == f32(0.25)  # decay_steps -> 20: 1 - 15/20
    assert cyc(20) == f32(0.0)
    assert cyc(21) == f32(1) - f32(21) / f32(30)


def test_polynomial_decay_default_end_learning_rate():
    sched = S.PolynomialDecay(0.1, 10)
    assert sched.end_learning_rate == 0.0001
    assert sched(10) == f32(0.0001)


# ---------------------------------------------------------------- InverseTimeDecay


@pytest.mark.parametrize("step", [0, 1, 5, 10, 100])
def test_inverse_time_decay(step):
    sched = S.InverseTimeDecay(0.1, decay_steps=3, decay_rate=0.5)
    expected = f32(0.1) / (f32(1) + f32(0.5) * (f32(step) / f32(3)))
    assert sched(step) == expected
    assert math.isclose(float(sched(step)), 0.1 / (1 + 0.5 * step / 3), rel_tol=1e-6)


def test_inverse_time_decay_staircase():
    sched = S.InverseTimeDecay(1.0, decay_steps=10, decay_rate=1.0, staircase=True)
    assert sched(9) == f32(1.0)
    assert sched(10) == f32(0.5)
    assert sched(35) == f32(0.25)


# ---------------------------------------------------------------- CosineDecay


def cos_decay_f32(from_lr, s, decay_steps, alpha):
    c = f32(0.5) * (f32(1) + np.cos(f32(math.pi) * (f32(s) / f32(decay_steps))))
    return f32(from_lr) * ((f32(1) - f32(alpha)) * c + f32(alpha))


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 500])
def test_cosine_decay_without_warmup(step):
    sched = S.CosineDecay(0.1, decay_steps=100, alpha=0.1)
    assert sched(step) == cos_decay_f32(0.1, min(step, 100), 100, 0.1)
    s = min(step, 100)
    ref = 0.1 * (0.9 * 0.5 * (1 + math.cos(math.pi * s / 100)) + 0.1)
    assert ulps(sched(step), f32(ref)) <= 2


def test_cosine_decay_endpoints():
    sched = S.CosineDecay(2.0, decay_steps=10, alpha=0.25)
    assert sched(0) == f32(2.0)
    assert sched(10) == f32(0.5)  # alpha * initial
    assert sched(1000) == f32(0.5)


def test_cosine_decay_warmup():
    sched = S.CosineDecay(0.0, decay_steps=100, alpha=0.0, warmup_target=0.1, warmup_steps=10)
    for s in [0, 1, 5, 9]:  # s < warmup_steps: linear from initial to target
        expected = (f32(0.1) - f32(0.0)) * (f32(s) / f32(10)) + f32(0.0)
        assert sched(s) == expected
    assert sched(5) == f32(0.05)
    assert sched(10) == f32(0.1)  # == warmup_steps: decay starts at the target
    assert sched(60) == cos_decay_f32(0.1, 50, 100, 0.0)
    assert abs(float(sched(60)) - 0.05) < 1e-8
    assert sched(110) == cos_decay_f32(0.1, 100, 100, 0.0)  # the end of the decay
    assert sched(10**6) == sched(110)  # clamped beyond decay_steps + warmup_steps
    assert abs(float(sched(110))) < 1e-9


def test_cosine_decay_warmup_from_nonzero_initial():
    sched = S.CosineDecay(0.01, decay_steps=20, alpha=0.5, warmup_target=1.0, warmup_steps=4)
    assert sched(1) == (f32(1.0) - f32(0.01)) * (f32(1) / f32(4)) + f32(0.01)
    assert sched(4) == f32(1.0)
    assert sched(24) == f32(0.5)
    assert sched(30) == f32(0.5)


def test_cosine_decay_at_warmup_end_uses_the_decay_branch():
    # here the warmup line would give (0.1 - 0.3) * 1 + 0.3 = 0.099999994, not 0.1
    sched = S.CosineDecay(0.3, decay_steps=10, warmup_target=0.1, warmup_steps=4)
    assert (f32(0.1) - f32(0.3)) * (f32(4) / f32(4)) + f32(0.3) != f32(0.1)
    assert sched(4) == f32(0.1)
    assert sched(3) == (f32(0.1) - f32(0.3)) * (f32(3) / f32(4)) + f32(0.3)


# ---------------------------------------------------------------- CosineDecayRestarts


def restarts_ref(init, first, t_mul, m_mul, alpha, step):
    """Float64 SGDR written out by periods (independent of the closed form)."""
    start, length, i = 0.0, float(first), 0
    while step >= start + length:
        start, length, i = start + length, length * t_mul, i + 1
    frac = (step - start) / length
    return init * ((1 - alpha) * 0.5 * m_mul**i * (1 + math.cos(math.pi * frac)) + alpha)


@pytest.mark.parametrize("t_mul", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 15, 20, 29, 30, 31, 69, 70, 200])
def test_cosine_decay_restarts_against_periods(t_mul, step):
    sched = S.CosineDecayRestarts(0.1, 10, t_mul=t_mul, m_mul=0.5, alpha=0.1)
    ref = restarts_ref(0.1, 10, t_mul, 0.5, 0.1, step)
    assert math.isclose(float(sched(step)), ref, rel_tol=1e-5, abs_tol=1e-8)


def test_cosine_decay_restarts_t_mul_1_is_exact_float32():
    sched = S.CosineDecayRestarts(1.0, 10, t_mul=1.0, m_mul=0.5, alpha=0.0)
    assert sched(0) == f32(1.0)
    assert sched(10) == f32(0.5)  # restart 1 at m_mul
    assert sched(20) == f32(0.25)
    f = f32(13) / f32(10)
    f = f - np.floor(f)
    assert sched(13) == f32(0.5) * f32(0.5) * (f32(1) + np.cos(f32(math.pi) * f))


def test_cosine_decay_restarts_t_mul_2_float32_formula():
    sched = S.CosineDecayRestarts(0.1, 10, t_mul=2.0, m_mul=1.0, alpha=0.0)
    for step in [0, 7, 10, 20, 30, 45, 70]:
        t, one = f32(2), f32(1)
        f = f32(step) / f32(10)
        i = np.floor(np.log(one - f * (one - t)) / np.log(t))
        f = (f - (one - t**i) / (one - t)) / t**i
        expected = f32(0.1) * ((one - f32(0)) * (f32(0.5) * f32(1) ** i * (one + np.cos(f32(math.pi) * f))) + f32(0))
        assert sched(step) == expected
    assert sched(10) == f32(0.1)  # restarts at 10 and 30 (periods of 10, 20, 40)
    assert sched(30) == f32(0.1)
    assert abs(float(sched(20)) - 0.05) < 1e-8


def test_cosine_decay_restarts_attributes_use_argument_names():
    sched = S.CosineDecayRestarts(0.1, 10, t_mul=3.0, m_mul=0.9)
    assert (sched.t_mul, sched.m_mul) == (3.0, 0.9)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: S.ExponentialDecay("0.1", 10, 0.5), r"`initial_learning_rate` must be a real number. Received: initial_learning_rate='0.1'"),
        (lambda: S.ExponentialDecay(0.1, 10, None), r"`decay_rate` must be a real number. Received: decay_rate=None"),
        (lambda: S.ExponentialDecay(0.1, 10, 0.5, staircase="yes"), r"`staircase` must be a bool. Received: staircase='yes'"),
        (lambda: S.PolynomialDecay(0.1, 10, cycle=1), r"`cycle` must be a bool. Received: cycle=1"),
        (lambda: S.CosineDecay(0.1, 10, name=3), r"`name` must be a string or None. Received: name=3"),
        (lambda: S.ExponentialDecay(True, 10, 0.5), r"`initial_learning_rate` must be a real number"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_arguments_are_stored_as_python_numbers():
    sched = S.ExponentialDecay(np.float32(0.5), np.int64(10), np.array(0.9), staircase=np.bool_(True))
    assert type(sched.initial_learning_rate) is float and sched.initial_learning_rate == 0.5
    assert type(sched.decay_steps) is int and sched.decay_steps == 10
    assert type(sched.decay_rate) is float and sched.staircase is True
    json.dumps(S.serialize(sched))


# ---------------------------------------------------------------- config and serialization

ALL = [
    S.ExponentialDecay(0.1, 100, 0.96, staircase=True, name="exp"),
    S.PiecewiseConstantDecay([100, 200.5], [1.0, 0.5, 0.1]),
    S.PolynomialDecay(0.1, 1000, end_learning_rate=0.01, power=0.5, cycle=True),
    S.InverseTimeDecay(0.1, 1.0, 0.5),
    S.CosineDecay(0.0, 1000, alpha=0.1, warmup_target=0.1, warmup_steps=100),
    S.CosineDecayRestarts(0.1, 100, t_mul=1.0, m_mul=0.9, alpha=0.01),
]

KERAS_KEYS = {
    "ExponentialDecay": ["initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name"],
    "PiecewiseConstantDecay": ["boundaries", "values", "name"],
    "PolynomialDecay": ["initial_learning_rate", "decay_steps", "end_learning_rate", "power", "cycle", "name"],
    "InverseTimeDecay": ["initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name"],
    "CosineDecay": ["initial_learning_rate", "decay_steps", "alpha", "name", "warmup_target", "warmup_steps"],
    "CosineDecayRestarts": ["initial_learning_rate", "first_decay_steps", "t_mul", "m_mul", "alpha", "name"],
}


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: type(s).__name__)
def test_config_key_errors_name_the_schedule_and_the_closest_key(schedule):
    """Not `_StepDecay.__init__() got an unexpected keyword argument`: the schedule's public name,
    its keys, and the nearest one to a misspelt key; a missing required key is named too."""
    import inspect

    cls = type(schedule)
    config = schedule.get_config()
    key = next(iter(config))  # the first (required) key
    owner = f"sgdgen.schedules.{cls.__name__}"
    misspelt = dict(config)
    misspelt[key + "s" if not key.endswith("s") else key[:-1]] = misspelt.pop(key)
    for bad, message in ((misspelt, rf"is not a valid config key of {owner}\. Did you mean `{key}`\?"),
                         ({k: v for k, v in config.items() if k != key}, rf"{owner} needs the config key `{key}`")):
        with pytest.raises(TypeError, match=message) as e:
            cls.from_config(bad)
        assert "__init__" not in str(e.value) and "Valid config keys of " + owner + ": " + ", ".join(
            p for p in inspect.signature(cls.__init__).parameters if p != "self") in str(e.value)
        with pytest.raises(ValueError, match=f"{cls.__name__}: invalid config .*" + message):
            S.deserialize({"class_name": cls.__name__, "config": bad})


def test_registry():
    assert list(S.SCHEDULES) == list(KERAS_KEYS)
    for name, cls in S.SCHEDULES.items():
        assert cls.__name__ == name and issubclass(cls, S.LearningRateSchedule)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: type(s).__name__)
def test_get_config_keys_and_attributes(sched):
    config = sched.get_config()
    assert list(config) == KERAS_KEYS[type(sched).__name__]
    params = list(inspect.signature(type(sched)).parameters)
    assert sorted(params) == sorted(config)  # keys == constructor argument names
    for k, v in config.items():
        assert getattr(sched, k) == v


@pytest.mark.parametrize("sched", ALL, ids=lambda s: type(s).__name__)
def test_json_round_trip(sched):
    d = S.serialize(sched)
    assert d["module"] == "keras.optimizers.schedules"
    assert d["class_name"] == type(sched).__name__
    assert d["registered_name"] is None
    back = S.deserialize(json.loads(json.dumps(d)))
    assert type(back) is type(sched)
    assert back.get_config() == sched.get_config()
    assert back == sched and hash(back) == hash(sched)
    for step in [0, 1, 99, 100, 101, 150, 5000]:
        assert back(step) == sched(step)
    assert type(sched).from_config(sched.get_config()) == sched


def test_deserialize_accepts_tf_keras_module_and_missing_module():
    config = {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5, "staircase": False, "name": None}
    a = S.deserialize({"module": "tf_keras.optimizers.schedules", "class_name": "ExponentialDecay", "config": config, "registered_name": None})
    b = S.deserialize({"class_name": "ExponentialDecay", "config": config})
    assert a == b == S.ExponentialDecay(0.1, 10, 0.5)
    assert S.deserialize(a) is a


def test_deserialize_errors():
    with pytest.raises(ValueError, match=r"class_name='Bogus'.*Known schedules: ExponentialDecay, PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay, CosineDecay, CosineDecayRestarts"):
        S.deserialize({"class_name": "Bogus", "config": {}})
    with pytest.raises(ValueError, match="Unknown schedule module 'torch.optim'"):
        S.deserialize({"module": "torch.optim", "class_name": "ExponentialDecay", "config": {}})
    with pytest.raises(ValueError, match="ExponentialDecay: invalid config"):
        S.deserialize({"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1}})
    with pytest.raises(ValueError, match="`decay_rate` must be a real number"):
        S.deserialize({"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": "x"}})
    with pytest.raises(ValueError, match="class_name"):
        S.deserialize({"config": {}})
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        S.serialize(0.1)


def test_get_config_returns_a_copy():
    sched = S.PiecewiseConstantDecay([10], [1.0, 0.5])
    sched.get_config()["boundaries"].append(99)
    assert sched.boundaries == [10]


def test_base_class_and_custom_subclass():
    with pytest.raises(NotImplementedError, match="must override `__call__"):
        S.LearningRateSchedule()(0)
    with pytest.raises(NotImplementedError, match="must override `get_config"):
        S.LearningRateSchedule().get_config()

    class Halving(S.LearningRateSchedule):
        def __call__(self, step):
            return np.float32(1.0) / np.float32(step + 1)

    h = Halving()
    assert h(1) == f32(0.5)
    assert h == h and h != Halving()  # no config: identity equality
    with pytest.raises(NotImplementedError):
        S.serialize(h)


def test_nan_propagates_silently():
    sched = S.CosineDecayRestarts(0.1, 10, t_mul=0.5)  # log of a negative number past the end
    with np.errstate(all="raise"):
        value = sched(100)
    assert np.isnan(value)
