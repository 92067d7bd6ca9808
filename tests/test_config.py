"""sgdgen.frontend.config: SGDConfig merging, validation (SEMANTICS §1, §2), get_config/from_config (§8)."""

import dataclasses
import json
import warnings

import numpy as np
import pytest

import sgdgen

from sgdgen.frontend import schedules as S
from sgdgen.frontend.config import EMAOption, GradientsClipOption, SGDConfig

DEFAULT_CONFIG = {
    "name": "SGD",
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "jit_compile": False,
    "is_legacy_optimizer": False,
    "learning_rate": 0.009999999776482582,
    "momentum": 0.0,
    "nesterov": False,
}

MOMENTUM_MSG = r"^`momentum` must be between \[0, 1\]\.$"


# ---------------------------------------------------------------- defaults and get_config


def test_default_get_config_exact():
    config = SGDConfig.create().get_config()
    assert list(config) == list(DEFAULT_CONFIG)
    assert config == DEFAULT_CONFIG
    assert type(config["learning_rate"]) is float
    json.dumps(config)


def test_dataclass_defaults_equal_create_defaults():
    assert SGDConfig() == SGDConfig.create()


def test_frozen():
    c = SGDConfig.create()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.momentum = 0.5


def test_options_are_plain_dataclasses():
    assert GradientsClipOption() == GradientsClipOption(None, None, None)
    assert EMAOption() == EMAOption(False, 0.99, 100)
    assert GradientsClipOption(clipnorm=-5).clipnorm == -5  # no validation of their own


# ---------------------------------------------------------------- learning rate


@pytest.mark.parametrize(
    "given,stored",
    [
        (0.01, 0.009999999776482582),
        (0.1, 0.10000000149011612),
        (1, 1.0),
        (np.float64(0.1), 0.10000000149011612),
        (np.float32(0.1), 0.10000000149011612),
        (np.array(0.1), 0.10000000149011612),
        (np.int32(2), 2.0),
        (1e-40, float(np.float32(1e-40))),  # float32 subnormal
    ],
)
def test_learning_rate_rounded_to_float32(given, stored):
    c = SGDConfig.create(learning_rate=given)
    assert type(c.learning_rate) is float
    assert c.learning_rate == stored
    assert c.get_config()["learning_rate"] == stored
    assert not c.lr_is_schedule


def test_learning_rate_object_with_float():
    class Scalar:
        def __float__(self):
            return 0.3

    assert SGDConfig.create(learning_rate=Scalar()).learning_rate == float(np.float32(0.3))


def test_callable_learning_rate_called_exactly_once():
    calls = []

    def lr():
        calls.append(1)
        return 0.1

    c = SGDConfig.create(learning_rate=lr)
    assert len(calls) == 1
    assert c.learning_rate == 0.10000000149011612
    c.get_config()
    c.get_config()
    _ = c.learning_rate
    assert len(calls) == 1
    assert c.get_config()["learning_rate"] == 0.10000000149011612


def test_schedule_learning_rate_kept():
    sched = S.ExponentialDecay(0.1, 10, 0.9)
    c = SGDConfig.create(learning_rate=sched)
    assert c.learning_rate is sched and c.lr_is_schedule
    assert c.get_config()["learning_rate"] == {
        "module": "keras.optimizers.schedules",
        "class_name": "ExponentialDecay",
        "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.9, "staircase": False, "name": None},
        "registered_name": None,
    }


@pytest.mark.parametrize("bad", ["0.1", None, [0.1], np.array([0.1, 0.2]), True, 1 + 2j])
def test_bad_learning_rate_type(bad):
    with pytest.raises(TypeError, match="`learning_rate` must be a float.*Received: learning_rate="):
        SGDConfig.create(learning_rate=bad)


def test_callable_learning_rate_returning_non_number():
    with pytest.raises(TypeError, match="learning_rate"):
        SGDConfig.create(learning_rate=lambda: "fast")
    with pytest.raises(TypeError, match="learning_rate"):
        SGDConfig.create(learning_rate=lambda: S.ExponentialDecay(0.1, 10, 0.9))


# ---------------------------------------------------------------- numbers


def test_momentum_types():
    assert SGDConfig.create(momentum=1).momentum == 1
    assert type(SGDConfig.create(momentum=1).get_config()["momentum"]) is int
    assert SGDConfig.create(momentum=0.9).momentum == 0.9  # as given, not float32-rounded
    m = SGDConfig.create(momentum=np.float32(0.5)).momentum
    assert type(m) is float and m == 0.5
    assert type(SGDConfig.create(momentum=np.array(0)).momentum) is int
    with pytest.raises(TypeError, match=r"`momentum` must be a real number.*Received: momentum='0.9'"):
        SGDConfig.create(momentum="0.9")
    with pytest.raises(TypeError, match="`momentum` must be a real number"):
        SGDConfig.create(momentum=None)


@pytest.mark.parametrize("bad", [-0.1, 1.01, 2, -1, np.float64(1.5)])
def test_momentum_range(bad):
    with pytest.raises(ValueError, match=MOMENTUM_MSG):
        SGDConfig.create(momentum=bad)


@pytest.mark.parametrize("ok", [0, 0.0, 1, 1.0, 0.99])
def test_momentum_range_edges_accepted(ok):
    assert SGDConfig.create(momentum=ok).momentum == ok


def test_weight_decay_and_clip_values():
    c = SGDConfig.create(weight_decay=0, clipvalue=np.float32(0.5), clipnorm=np.array(2))
    assert c.weight_decay == 0 and c.weight_decay is not None  # 0 is not None: decay runs
    assert type(c.clipvalue) is float and c.clipvalue == 0.5
    assert type(c.clipnorm) is int and c.clipnorm == 2
    for arg in ["weight_decay", "clipnorm", "clipvalue", "global_clipnorm"]:
        with pytest.raises(TypeError, match=f"`{arg}` must be a real number.*Received: {arg}='x'"):
            SGDConfig.create(**{arg: "x"})


@pytest.mark.parametrize("arg", ["nesterov", "jit_compile", "amsgrad", "use_ema"])
def test_flags_must_be_bool(arg):
    with pytest.raises(TypeError, match=f"`{arg}` must be a bool. Received: {arg}='yes'"):
        SGDConfig.create(**{arg: "yes"})


def test_name_must_be_str():
    with pytest.raises(TypeError, match="`name` must be a string. Received: name=3"):
        SGDConfig.create(name=3)


# ---------------------------------------------------------------- §2 validation


@pytest.mark.parametrize("bad", [1.5, -0.01, 2])
def test_ema_momentum_range(bad):
    with pytest.raises(ValueError, match=rf"^`ema_momentum` must be in the range \[0, 1\]\. Received: ema_momentum={bad}$"):
        SGDConfig.create(use_ema=True, ema_momentum=bad)


def test_ema_checks_only_when_use_ema():
    c = SGDConfig.create(use_ema=False, ema_momentum=5.0, ema_overwrite_frequency=2.5)
    assert c.ema_momentum == 5.0 and c.ema_overwrite_frequency == 2.5
    assert c.ema_overwrite_every is None


@pytest.mark.parametrize("bad", [2.0, -1, "3"])
def test_ema_overwrite_frequency_invalid(bad):
    msg = rf"^`ema_overwrite_frequency` must be an integer > 1 or None\. Received: ema_overwrite_frequency={bad}$"
    with pytest.raises(ValueError, match=msg):
        SGDConfig.create(use_ema=True, ema_overwrite_frequency=bad)


@pytest.mark.parametrize("ok,every", [(None, None), (0, None), (1, 1), (True, 1), (5, 5)])
def test_ema_overwrite_frequency_accepted(ok, every):
    c = SGDConfig.create(use_ema=True, ema_overwrite_frequency=ok)
    assert c.ema_overwrite_frequency is ok
    assert c.ema_overwrite_every == every


@pytest.mark.parametrize("cn,gcn", [(1.0, 1.0), (0, 0), (0.5, -1.0)])
def test_clipnorm_and_global_clipnorm_exclusive(cn, gcn):
    msg = rf"^At most one of `clipnorm` and `global_clipnorm` can be set\. Received: clipnorm={cn}, global_clipnorm={gcn}\.$"
    with pytest.raises(ValueError, match=msg):
        SGDConfig.create(clipnorm=cn, global_clipnorm=gcn)


def test_clipvalue_allowed_beside_a_norm_clip():
    assert SGDConfig.create(clipnorm=1.0, clipvalue=0.5).clip_mode == "clipnorm"
    assert SGDConfig.create(global_clipnorm=1.0, clipvalue=0.5).clip_mode == "global_clipnorm"


def test_validation_order():
    # EMA checks before the clip check
    with pytest.raises(ValueError, match="ema_momentum"):
        SGDConfig.create(use_ema=True, ema_momentum=3, clipnorm=1, global_clipnorm=1)
    # clip check before kwargs
    with pytest.raises(ValueError, match="At most one"):
        SGDConfig.create(clipnorm=1, global_clipnorm=1, decay=0.1)
    # kwargs before the learning rate: the callable is never called
    calls = []
    with pytest.raises(ValueError, match="`decay` is deprecated"):
        SGDConfig.create(learning_rate=lambda: calls.append(1) or 0.1, decay=0.1)
    assert calls == []
    # the learning rate before momentum
    with pytest.raises(TypeError, match="learning_rate"):
        SGDConfig.create(learning_rate="x", momentum=7)


# ---------------------------------------------------------------- kwargs (§1)


@pytest.mark.parametrize("k, fix", [("decay", "use a learning-rate schedule instead"),
                                    ("gradient_aggregator", "aggregate the gradients yourself"),
                                    ("gradient_transformers", "transform the gradients yourself")])
def test_legacy_kwargs_raise(k, fix):
    """tf_keras raises ValueError for these; the message says what to do in sgdgen, not 'use tf.keras ... legacy'."""
    with pytest.raises(ValueError, match=f"^`{k}` is deprecated .* sgdgen.SGD does not support it: {fix}") as e:
        SGDConfig.create(**{k: 0.1})
    assert "legacy" not in str(e.value) and "tf.keras" not in str(e.value)


VALID = ("learning_rate, momentum, nesterov, amsgrad, gradients_clip_option, ema_option, jit_compile, name, mesh, "
         "weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency, "
         "shard_update_over, skip_nonfinite, buckets, bucket_threshold")


@pytest.mark.parametrize("k, closest", [("momentun", "momentum"), ("learningrate", "learning_rate"),
                                        ("global_clip_norm", "global_clipnorm"), ("foo", None)])
def test_unknown_kwarg_names_sgd_the_valid_arguments_and_the_closest(k, closest):
    with pytest.raises(TypeError) as e:
        sgdgen.SGD(0.1, **{k: 0.9})
    hint = f" Did you mean `{closest}`?" if closest else ""
    assert str(e.value) == f"`{k}` is not a valid argument of sgdgen.SGD.{hint} Valid arguments of sgdgen.SGD: {VALID}."


def test_valid_argument_list_is_sgds_signature():
    """The listed names are exactly what sgdgen.SGD accepts (its signature and the flat keyword arguments)."""
    import inspect

    listed = VALID.split(", ")
    positional = [p for p in inspect.signature(sgdgen.SGD).parameters if p != "kwargs"]
    assert listed[:len(positional)] == positional
    defaults = {"use_ema": False, "ema_momentum": 0.99, "skip_nonfinite": False, "buckets": False,
                "bucket_threshold": 1 << 16}
    for name in listed[len(positional):]:
        sgdgen.SGD(0.1, **{name: defaults.get(name)})


def test_lr_kwarg_warns_and_is_ignored():
    with pytest.warns(UserWarning, match="`lr` is deprecated and ignored by sgdgen.SGD .*use `learning_rate`"):
        c = SGDConfig.create(lr=0.5)
    assert c.learning_rate == 0.009999999776482582
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SGDConfig.create(lr=0)  # falsy: ignored silently, as tf_keras does


def test_is_legacy_optimizer_dropped():
    assert SGDConfig.create(is_legacy_optimizer=True) == SGDConfig.create()


def test_amsgrad_warns_and_has_no_effect():
    with pytest.warns(UserWarning, match="`amsgrad` has no effect"):
        c = SGDConfig.create(amsgrad=True)
    assert c.amsgrad is True
    assert "amsgrad" not in c.get_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SGDConfig.create(amsgrad=False)


# ---------------------------------------------------------------- option objects (decision 13)


def test_gradients_clip_option_supplies_fields():
    c = SGDConfig.create(gradients_clip_option=GradientsClipOption(clipvalue=0.5, global_clipnorm=2.0))
    assert (c.clipnorm, c.clipvalue, c.global_clipnorm) == (None, 0.5, 2.0)
    assert c.clip_mode == "global_clipnorm" and c.clip_value == 2.0


def test_ema_option_supplies_all_fields_including_frequency_100():
    c = SGDConfig.create(ema_option=EMAOption(use_ema=True, ema_momentum=0.9))
    assert (c.use_ema, c.ema_momentum, c.ema_overwrite_frequency) == (True, 0.9, 100)
    assert c.ema_overwrite_every == 100
    # even a default EMAOption supplies frequency 100 (the flat default is None)
    assert SGDConfig.create(ema_option=EMAOption()).ema_overwrite_frequency == 100
    assert SGDConfig.create().ema_overwrite_frequency is None


def test_option_values_go_through_validation():
    with pytest.raises(ValueError, match="ema_momentum=1.5"):
        SGDConfig.create(ema_option=EMAOption(use_ema=True, ema_momentum=1.5))
    with pytest.raises(ValueError, match="At most one of `clipnorm` and `global_clipnorm`"):
        SGDConfig.create(gradients_clip_option=GradientsClipOption(clipnorm=1.0, global_clipnorm=1.0))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"gradients_clip_option": GradientsClipOption(clipnorm=1.0), "clipnorm": 2.0}, "clipnorm"),
        ({"gradients_clip_option": GradientsClipOption(clipnorm=1.0), "clipvalue": 0.5}, "clipvalue"),
        ({"gradients_clip_option": GradientsClipOption(), "global_clipnorm": None}, "global_clipnorm"),
        ({"ema_option": EMAOption(use_ema=True), "use_ema": True}, "use_ema"),
        ({"ema_option": EMAOption(), "ema_momentum": 0.99}, "ema_momentum"),
        ({"ema_option": EMAOption(), "ema_overwrite_frequency": None}, "ema_overwrite_frequency"),
    ],
)
def test_field_given_both_ways(kwargs, field):
    with pytest.raises(ValueError, match=rf"^`{field}` was given both as an argument and in `"):
        SGDConfig.create(**kwargs)


def test_flat_args_beside_an_unrelated_option_object():
    c = SGDConfig.create(ema_option=EMAOption(use_ema=True), clipnorm=1.0, weight_decay=0.1)
    assert (c.use_ema, c.clipnorm, c.weight_decay) == (True, 1.0, 0.1)


def test_option_object_type_checked():
    with pytest.raises(TypeError, match="`ema_option` must be a EMAOption or None"):
        SGDConfig.create(ema_option={"use_ema": True})
    with pytest.raises(TypeError, match="`gradients_clip_option` must be a GradientsClipOption"):
        SGDConfig.create(gradients_clip_option=1.0)


def test_positional_seed_signature():
    c = SGDConfig.create(0.1, 0.9, True, False, None, None, True, "opt")
    assert (c.learning_rate, c.momentum, c.nesterov, c.jit_compile, c.name) == (0.10000000149011612, 0.9, True, True, "opt")
    assert c.get_config()["jit_compile"] is True  # reported as given


# ---------------------------------------------------------------- derived properties


@pytest.mark.parametrize(
    "clipnorm,global_clipnorm,clipvalue,mode,value",
    [
        (None, None, None, None, None),
        (1.0, None, None, "clipnorm", 1.0),
        (None, 2.0, None, "global_clipnorm", 2.0),
        (None, None, 0.5, "clipvalue", 0.5),
        (1.0, None, 0.5, "clipnorm", 1.0),
        (None, 2.0, 0.5, "global_clipnorm", 2.0),
        (0, None, 0.5, "clipvalue", 0.5),  # a 0 norm clip is off, so clipvalue applies
        (-1.0, None, 0.5, "clipvalue", 0.5),
        (None, 0.0, 0.5, "clipvalue", 0.5),
        (None, -2.0, None, None, None),
        (None, None, 0, None, None),
        (None, None, -0.5, None, None),
    ],  # a NaN clip (once a disabled one, as in tf_keras) is refused: tests/test_limits.py
)
def test_clip_mode_priority(clipnorm, global_clipnorm, clipvalue, mode, value):
    c = SGDConfig.create(clipnorm=clipnorm, global_clipnorm=global_clipnorm, clipvalue=clipvalue)
    assert c.clip_mode == mode
    assert c.clip_value == value


def test_clipnorm_wins_over_global_clipnorm_when_both_present():
    # create() refuses both; a config built directly still resolves them in Keras' order
    c = SGDConfig(clipnorm=1.0, global_clipnorm=2.0, clipvalue=0.5)
    assert (c.clip_mode, c.clip_value) == ("clipnorm", 1.0)
    c = SGDConfig(clipnorm=0.0, global_clipnorm=2.0, clipvalue=0.5)
    assert (c.clip_mode, c.clip_value) == ("global_clipnorm", 2.0)


def test_ema_overwrite_every_needs_use_ema():
    assert SGDConfig.create(ema_overwrite_frequency=3).ema_overwrite_every is None
    assert SGDConfig.create(use_ema=True, ema_overwrite_frequency=3).ema_overwrite_every == 3
    assert SGDConfig.create(use_ema=True).ema_overwrite_every is None


# ---------------------------------------------------------------- from_config / JSON

SCHEDULES = [
    S.ExponentialDecay(0.1, 100, 0.96, staircase=True),
    S.PiecewiseConstantDecay([10, 20], [0.1, 0.05, 0.01], name="pc"),
    S.PolynomialDecay(0.1, 100, end_learning_rate=0.001, power=2.0, cycle=True),
    S.InverseTimeDecay(0.1, 10, 0.5, staircase=True),
    S.CosineDecay(0.0, 100, alpha=0.1, warmup_target=0.1, warmup_steps=10),
    S.CosineDecayRestarts(0.1, 10, t_mul=1.0, m_mul=0.5),
]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: type(s).__name__)
def test_json_round_trip_with_each_schedule(sched):
    c = SGDConfig.create(learning_rate=sched, momentum=0.9, nesterov=True, weight_decay=1e-4,
                         global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=10, name="sgd")
    text = c.to_json()
    back = SGDConfig.from_json(text)
    assert back == c
    assert back.get_config() == c.get_config()
    assert isinstance(back.learning_rate, type(sched))
    assert back.learning_rate(15) == sched(15)
    assert SGDConfig.from_config(json.loads(text)).get_config() == json.loads(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"learning_rate": 0.1, "momentum": 1},
        {"learning_rate": np.float32(0.3), "clipnorm": 1, "clipvalue": 0.2, "weight_decay": 0.0},
        {"ema_option": EMAOption(True, 0.5, 3), "jit_compile": True},
    ],
)
def test_from_config_round_trip(kwargs):
    c = SGDConfig.create(**kwargs)
    config = c.get_config()
    assert SGDConfig.from_config(config).get_config() == config
    assert json.loads(json.dumps(config)) == config
    assert SGDConfig.from_config(config) == c


def test_from_config_reads_a_tf_keras_config():
    # what tf_keras 2.21 SGD(0.1, momentum=0.9).get_config() returns: lr as np.float32
    config = dict(DEFAULT_CONFIG, learning_rate=np.float32(0.1), momentum=0.9, is_legacy_optimizer=False)
    c = SGDConfig.from_config(config)
    assert c.learning_rate == 0.10000000149011612 and c.momentum == 0.9
    sched_config = dict(DEFAULT_CONFIG, learning_rate={
        "module": "keras.optimizers.schedules", "class_name": "CosineDecay",
        "config": {"initial_learning_rate": 0.1, "decay_steps": 100, "alpha": 0.0, "name": None,
                   "warmup_target": None, "warmup_steps": 0},
        "registered_name": None})
    assert SGDConfig.from_config(sched_config).learning_rate == S.CosineDecay(0.1, 100)


def test_from_config_unknown_key():
    with pytest.raises(TypeError, match="^`bogus` is not a valid argument of sgdgen.SGD"):
        SGDConfig.from_config(dict(DEFAULT_CONFIG, bogus=1))


def test_from_config_does_not_mutate_input():
    config = SGDConfig.create(learning_rate=SCHEDULES[0]).get_config()
    snapshot = json.dumps(config)
    SGDConfig.from_config(config)
    assert json.dumps(config) == snapshot


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("momentum", '"high"', "momentum"),
        ("momentum", "3", "momentum"),
        ("clipnorm", "[1]", "clipnorm"),
        ("nesterov", '"yes"', "nesterov"),
        ("ema_momentum", '"x"', "ema_momentum"),
        ("learning_rate", "null", "learning_rate"),
        ("learning_rate", '{"class_name": "Nope", "config": {}}', "Nope"),
        ("bogus", "1", "bogus"),
    ],
)
def test_from_json_bad_value_raises_value_error_naming_field(field, value, match):
    text = '{"name": "SGD", "%s": %s}' % (field, value)
    with pytest.raises(ValueError, match=match):
        SGDConfig.from_json(text)


def test_from_json_not_an_object_or_not_json():
    with pytest.raises(ValueError, match="JSON object"):
        SGDConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="not valid JSON"):
        SGDConfig.from_json("{momentum: 0.9")


def test_to_json_is_get_config():
    c = SGDConfig.create(learning_rate=0.05, clipvalue=1.0)
    assert json.loads(c.to_json()) == c.get_config()
    assert "\n" not in c.to_json(indent=None)
