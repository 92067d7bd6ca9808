"""Limits on what sgdgen accepts (issue 16, items 8 and 9): finite hyperparameters and
variable shapes that the platform can address, refused with the field or variable named
before anything is generated or any state changes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import sgdgen
from sgdgen.frontend import schedules as S
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import INT64_MAX, MAX_SHARD_BYTES, Layout, Mesh, SpecError, VarSpec

NAN, INF = math.nan, math.inf
#: The smallest power of ten that float32 cannot hold: it rounds to inf, though a finite double.
with np.errstate(over="ignore"):
    F32_OVERFLOW = next(10.0**k for k in range(30, 60) if not np.isfinite(np.float32(10.0**k)))
NON_FINITE = [NAN, INF, -INF, np.float64(NAN), np.array(INF)]


def test_f32_overflow_is_the_issue_s_1e39() -> None:
    assert F32_OVERFLOW == 1e39 and math.isfinite(F32_OVERFLOW)


# ---------------------------------------------------------------- hyperparameters (16.8)


@pytest.mark.parametrize("bad", [*NON_FINITE, F32_OVERFLOW, -F32_OVERFLOW, 10**400])
def test_learning_rate_must_be_finite_in_float32(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^`learning_rate` must be a finite number.*Received: learning_rate="):
        SGDConfig.create(learning_rate=bad)


def test_learning_rate_overflow_message_says_float32() -> None:
    with pytest.raises(ValueError, match=r"learning_rate=1e\+39 \(inf in float32"):
        SGDConfig.create(learning_rate=F32_OVERFLOW)


def test_callable_learning_rate_returning_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number"):
        SGDConfig.create(learning_rate=lambda: NAN)


def test_largest_float32_learning_rate_is_accepted() -> None:
    big = float(np.finfo(np.float32).max)
    assert SGDConfig.create(learning_rate=big).learning_rate == big


@pytest.mark.parametrize("bad", [NAN, np.float32(NAN)])
def test_nan_momentum_is_refused(bad: object) -> None:
    # NaN passes tf_keras' `momentum < 0 or momentum > 1`.
    with pytest.raises(ValueError, match=r"^`momentum` must be a finite number"):
        SGDConfig.create(momentum=bad)


@pytest.mark.parametrize("bad", [INF, -INF])
def test_infinite_momentum_keeps_tf_keras_message(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^`momentum` must be between \[0, 1\]\.$"):
        SGDConfig.create(momentum=bad)


@pytest.mark.parametrize("arg", ["weight_decay", "clipnorm", "clipvalue", "global_clipnorm"])
@pytest.mark.parametrize("bad", NON_FINITE)
def test_decay_and_clips_must_be_finite(arg: str, bad: object) -> None:
    with pytest.raises(ValueError, match=rf"^`{arg}` must be a finite number.*Received: {arg}="):
        SGDConfig.create(**{arg: bad})


def test_weight_decay_must_be_finite_in_float32() -> None:
    with pytest.raises(ValueError, match=r"`weight_decay` must be a finite number.*inf in float32"):
        SGDConfig.create(weight_decay=F32_OVERFLOW)


@pytest.mark.parametrize("use_ema", [True, False])
def test_nan_ema_momentum_is_refused(use_ema: bool) -> None:
    with pytest.raises(ValueError, match=r"^`ema_momentum` must be a finite number"):
        SGDConfig.create(use_ema=use_ema, ema_momentum=NAN)


def test_infinite_ema_momentum_keeps_tf_keras_message() -> None:
    with pytest.raises(ValueError, match=r"^`ema_momentum` must be in the range \[0, 1\]"):
        SGDConfig.create(use_ema=True, ema_momentum=INF)


def test_from_config_refuses_json_nan() -> None:
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number"):
        SGDConfig.from_json('{"learning_rate": NaN}')


@pytest.mark.parametrize("bad", [NAN, F32_OVERFLOW])
def test_sgd_constructor_refuses(bad: float) -> None:
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number"):
        sgdgen.SGD(learning_rate=bad)


@pytest.mark.parametrize("bad", [NAN, INF, F32_OVERFLOW])
def test_learning_rate_setter_refuses_and_keeps_the_rate(bad: float) -> None:
    opt = sgdgen.SGD(learning_rate=0.5)
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number"):
        opt.learning_rate = bad
    assert opt.learning_rate == np.float32(0.5)


SCHEDULE_FLOATS = [
    (S.ExponentialDecay, dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.9)),
    (S.InverseTimeDecay, dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.9)),
    (S.PolynomialDecay, dict(initial_learning_rate=0.1, decay_steps=10, end_learning_rate=0.01, power=2.0)),
    (S.CosineDecay, dict(initial_learning_rate=0.1, decay_steps=10, alpha=0.1, warmup_target=0.2, warmup_steps=5)),
    (S.CosineDecayRestarts, dict(initial_learning_rate=0.1, first_decay_steps=10, t_mul=2.0, m_mul=0.5, alpha=0.1)),
]
SCHEDULE_CASES = [(cls, kw, arg) for cls, kw in SCHEDULE_FLOATS for arg in kw]


@pytest.mark.parametrize("cls,kwargs,arg", SCHEDULE_CASES, ids=[f"{c.__name__}-{a}" for c, _, a in SCHEDULE_CASES])
@pytest.mark.parametrize("bad", [NAN, INF, F32_OVERFLOW], ids=["nan", "inf", "1e39"])
def test_schedule_floats_must_be_finite_in_float32(cls: type, kwargs: dict, arg: str, bad: float) -> None:
    cls(**kwargs)  # the valid arguments are accepted
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: `{arg}` must be finite in float32.*Received: {arg}="):
        cls(**{**kwargs, arg: bad})


@pytest.mark.parametrize("arg,value", [("boundaries", [5, NAN]), ("values", [0.1, INF, 0.01])])
def test_piecewise_constant_entries_must_be_finite(arg: str, value: list[float]) -> None:
    kwargs = {"boundaries": [5, 10], "values": [0.1, 0.05, 0.01], arg: value}
    with pytest.raises(ValueError, match=rf"^PiecewiseConstantDecay: `{arg}` must be finite"):
        S.PiecewiseConstantDecay(**kwargs)


def test_schedule_with_non_finite_argument_is_refused_by_sgd() -> None:
    with pytest.raises(ValueError, match="`initial_learning_rate` must be finite"):
        sgdgen.SGD(learning_rate=S.ExponentialDecay(NAN, 10, 0.5))


# ---------------------------------------------------------------- shapes (16.9)

MESH8 = Mesh({"batch": 2, "model": 4})


@pytest.mark.parametrize("shape", [[2**62], [2**40, 2**40], [2**63 - 1, 2]])
def test_shapes_beyond_int64_bytes_are_refused(shape: list[int]) -> None:
    assert math.prod(shape) * 4 > INT64_MAX  # the case: XLA's int64 byte size overflows
    with pytest.raises(SpecError, match=r"^variable 'huge': shape .* more than the int64 sizes XLA can represent"):
        VarSpec.create("huge", shape, "float32", Mesh())


def test_dimension_beyond_int64_is_refused_even_with_zero_elements() -> None:
    with pytest.raises(SpecError, match=r"^variable 'w': dimension 1 of shape .* is larger than int64"):
        VarSpec.create("w", [0, 2**63], "float32", Mesh())


def test_shapes_that_compiled_before_are_accepted() -> None:
    spec = VarSpec.create("w", [2**40], "float32", Mesh())  # 4 TiB: the issue's case that compiles
    assert spec.nbytes == 2**42 <= MAX_SHARD_BYTES


def test_shard_bound_is_exact() -> None:
    """The largest unsharded float32 vector is 2**47 bytes; one element more is refused."""
    limit = MAX_SHARD_BYTES // 4
    VarSpec.create("w", [limit], "float32", Mesh())
    with pytest.raises(SpecError, match=r"^variable 'w': .* bytes on each device .* 2\*\*47 bytes"):
        VarSpec.create("w", [limit + 1], "float32", Mesh())


def test_sharding_brings_a_variable_within_the_bound() -> None:
    """The bound is per device: 8 shards of 2**47 bytes each are accepted, replicated they are not."""
    n = 8 * MAX_SHARD_BYTES // 4
    VarSpec("w", (n,), "float32", Layout([("batch", "model")], MESH8))
    with pytest.raises(SpecError, match="bytes on each device"):
        VarSpec("w", (n,), "float32", Layout.replicated(MESH8, 1))


def test_dtype_width_counts() -> None:
    n = MAX_SHARD_BYTES // 4 + 1  # over the bound in float32, within it in bfloat16
    VarSpec.create("w", [n], "bfloat16", Mesh())
    with pytest.raises(SpecError, match="bytes on each device"):
        VarSpec.create("w", [n], "float32", Mesh())
