"""Keras learning-rate schedules with tf_keras 2.21 semantics, evaluated in NumPy float32.

Each schedule mirrors its `tf_keras.optimizers.schedules` namesake (SEMANTICS.md §5):
the same constructor arguments, stored as attributes of the same names (the StableHLO
generator reads them), the same `get_config` keys in Keras order, and `__call__(step)`
giving the float32 value at an iteration count. Every intermediate is `np.float32`,
whatever the Python types of the arguments, so this module is the host-side oracle for
the schedule arithmetic the compiled step does on device.

Argument checks follow tf_keras 2.21, which checks only the length of
PiecewiseConstantDecay's lists: a zero or negative `decay_steps` (e.g. a warmup-only
`CosineDecay(decay_steps=0, warmup_target=...)`) is accepted and gives what TF's float32
arithmetic gives (NaN once `0/0` is reached). Keras 3 refuses `decay_steps <= 0`; sgdgen
follows tf_keras. sgdgen adds only checks for values it could not compile: non-numbers,
and PiecewiseConstantDecay boundaries that are empty, non-finite or decreasing (tf_keras
fails on those at the first call, or at the steps where its `tf.case` overlaps).

A user subclass of `LearningRateSchedule` (any class not in `SCHEDULES`) cannot be
compiled: the optimizer evaluates it on the host at every step with `evaluate` and feeds
the value to the step as its runtime learning rate, as tf_keras evaluates a schedule in
eager mode.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import numpy as np

from sgdgen.frontend.arguments import as_flag, as_real, check_names, parameters

__all__ = [
    "LearningRateSchedule",
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
    "SCHEDULES",
    "is_compiled",
    "evaluate",
    "serialize",
    "deserialize",
]

_F32 = np.float32
_ONE = _F32(1.0)
_HALF = _F32(0.5)
_PI = _F32(math.pi)  # tf.constant(math.pi, float32)


def _real(owner: str, arg: str, value: Any) -> int | float:
    """Return `value` as a Python int or float (`arguments.as_real`), finite in float32.

    Stored values stay JSON-serialisable, so `get_config` round-trips through JSON.
    """
    number = as_real(value)
    if number is None:
        raise ValueError(f"{owner}: `{arg}` must be a real number. Received: {arg}={value!r}")
    return _finite_f32(owner, arg, number)


def _finite_f32(owner: str, arg: str, value: int | float) -> int | float:
    """`value` if it is finite in float32, the precision of all schedule arithmetic; NaN, +-Inf
    or a number beyond float32's range (1e39) would make the learning rate NaN or inf."""
    try:
        with np.errstate(over="ignore"):
            finite = bool(np.isfinite(_F32(float(value))))
    except OverflowError:  # an int beyond the double range
        finite = False
    if not finite:
        raise ValueError(
            f"{owner}: `{arg}` must be finite in float32 (|x| up to about 3.4e38), "
            f"the precision schedules compute in. Received: {arg}={value!r}"
        )
    return value


def _flag(owner: str, arg: str, value: Any) -> bool:
    """A Python or NumPy bool, stored as a Python bool."""
    flag = as_flag(value)
    if flag is None:
        raise ValueError(f"{owner}: `{arg}` must be a bool. Received: {arg}={value!r}")
    return bool(flag)


def _name(owner: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{owner}: `name` must be a string or None. Received: name={value!r}")
    return value


def _step_f32(step: Any) -> np.float32:
    """`tf.cast(iterations, float32)`: the int64 step rounded to float32."""
    return _F32(np.int64(step))


class LearningRateSchedule:
    """Base class: a callable from the iteration count to a float32 learning rate.

    Subclasses either override `__call__` (as in Keras) or implement `_compute` and list
    their constructor arguments, in Keras config order, in `_CONFIG_KEYS`.
    """

    _CONFIG_KEYS: ClassVar[tuple[str, ...]] = ()

    def __call__(self, step: int) -> np.float32:
        """The learning rate used by the step that starts at `iterations == step`."""
        with np.errstate(all="ignore"):  # inf / NaN propagate silently, as in TF
            return _F32(self._compute(step))

    def _compute(self, step: int) -> np.float32:
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' must override `__call__(self, step)`."
        )

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (including `name`), in Keras order."""
        if not self._CONFIG_KEYS:
            raise NotImplementedError(
                f"Learning rate schedule '{type(self).__name__}' must override "
                "`get_config()` in order to be serializable."
            )
        return {k: _copy(getattr(self, k)) for k in self._CONFIG_KEYS}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearningRateSchedule:
        """Rebuild a schedule from `get_config()`; an unknown or missing key is a TypeError that
        names this schedule, its keys and the closest one (not a base class's `__init__`)."""
        names, required = parameters(cls.__init__)
        check_names(f"sgdgen.schedules.{cls.__name__}", config, names, required, kind="config key")
        return cls(**config)

    def _key(self) -> tuple[type, str]:
        return type(self), json.dumps(self.get_config(), sort_keys=True, default=repr)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LearningRateSchedule):
            return NotImplemented
        try:
            return self._key() == other._key()
        except NotImplementedError:
            return self is other

    def __hash__(self) -> int:
        try:
            return hash(self._key())
        except NotImplementedError:
            return id(self)

    def __repr__(self) -> str:
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except NotImplementedError:
            args = ""
        return f"{type(self).__name__}({args})"


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


class _StepDecay(LearningRateSchedule):
    """Shared by ExponentialDecay and InverseTimeDecay: the same arguments, and the same
    progress `p = step / decay_steps`, floored when `staircase`."""

    _CONFIG_KEYS = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name")

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: float,
        decay_rate: float,
        staircase: bool = False,
        name: str | None = None,
    ) -> None:
        owner = type(self).__name__
        self.initial_learning_rate = _real(owner, "initial_learning_rate", initial_learning_rate)
        self.decay_steps = _real(owner, "decay_steps", decay_steps)
        self.decay_rate = _real(owner, "decay_rate", decay_rate)
        self.staircase = _flag(owner, "staircase", staircase)
        self.name = _name(owner, name)

    def _progress(self, step: int) -> np.float32:
        p = _step_f32(step) / _F32(self.decay_steps)
        return np.floor(p) if self.staircase else p


class ExponentialDecay(_StepDecay):
    """`initial_learning_rate * decay_rate ** (step / decay_steps)` (floored if staircase)."""

    def _compute(self, step: int) -> np.float32:
        return _F32(self.initial_learning_rate) * np.power(_F32(self.decay_rate), self._progress(step))


class PiecewiseConstantDecay(LearningRateSchedule):
    """`values[i]` for `boundaries[i-1] < step <= boundaries[i]` (right edge inclusive).

    Boundaries are compared as int64, so a float boundary is truncated, as tf_keras does
    when it casts them to the step dtype.
    """

    _CONFIG_KEYS = ("boundaries", "values", "name")

    def __init__(self, boundaries: list[float], values: list[float], name: str | None = None) -> None:
        owner = type(self).__name__
        boundaries = [_real(owner, "boundaries", b) for b in _sequence(owner, "boundaries", boundaries)]
        values = [_real(owner, "values", v) for v in _sequence(owner, "values", values)]
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                f"{owner}: The length of boundaries should be 1 less than the length of values. "
                f"Received: boundaries={boundaries} of length {len(boundaries)}, "
                f"and values={values} of length {len(values)}."
            )
        if not boundaries:
            raise ValueError(f"{owner}: `boundaries` must not be empty. Received: boundaries=[]")
        if not all(math.isfinite(b) for b in boundaries):
            raise ValueError(f"{owner}: `boundaries` must be finite. Received: boundaries={boundaries}")
        steps = [int(np.int64(b)) for b in boundaries]
        if any(lo > hi for lo, hi in zip(steps, steps[1:])):
            raise ValueError(
                f"{owner}: `boundaries` must be increasing (as int64 steps). "
                f"Received: boundaries={boundaries}"
            )
        self.boundaries = boundaries
        self.values = values
        self.name = _name(owner, name)

    def _compute(self, step: int) -> np.float32:
        s = np.int64(step)
        for b, v in zip(self.boundaries, self.values):
            if s <= np.int64(b):
                return _F32(v)
        return _F32(self.values[-1])


def _sequence(owner: str, arg: str, value: Any) -> list[Any]:
    if isinstance(value, np.ndarray):
        return list(value.reshape(-1))
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{owner}: `{arg}` must be a list of numbers. Received: {arg}={value!r}")
    return list(value)


class PolynomialDecay(LearningRateSchedule):
    """`(initial - end) * (1 - step/decay_steps) ** power + end`, clamped or cycled."""

    _CONFIG_KEYS = (
        "initial_learning_rate", "decay_steps", "end_learning_rate", "power", "cycle", "name",
    )

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: float,
        end_learning_rate: float = 0.0001,
        power: float = 1.0,
        cycle: bool = False,
        name: str | None = None,
    ) -> None:
        owner = type(self).__name__
        self.initial_learning_rate = _real(owner, "initial_learning_rate", initial_learning_rate)
        self.decay_steps = _real(owner, "decay_steps", decay_steps)
        self.end_learning_rate = _real(owner, "end_learning_rate", end_learning_rate)
        self.power = _real(owner, "power", power)
        self.cycle = _flag(owner, "cycle", cycle)
        self.name = _name(owner, name)

    def _compute(self, step: int) -> np.float32:
        s = _step_f32(step)
        decay_steps = _F32(self.decay_steps)
        if self.cycle:
            # the first multiple of decay_steps that is >= step (1 at step 0)
            multiplier = _ONE if s == 0 else np.ceil(s / decay_steps)
            decay_steps = decay_steps * multiplier
        else:
            s = np.minimum(s, decay_steps)
        p = s / decay_steps
        initial, end = _F32(self.initial_learning_rate), _F32(self.end_learning_rate)
        return (initial - end) * np.power(_ONE - p, _F32(self.power)) + end


class InverseTimeDecay(_StepDecay):
    """`initial_learning_rate / (1 + decay_rate * step / decay_steps)` (floored if staircase)."""

    def _compute(self, step: int) -> np.float32:
        return _F32(self.initial_learning_rate) / (_ONE + _F32(self.decay_rate) * self._progress(step))


class CosineDecay(LearningRateSchedule):
    """Cosine decay from the initial (or warmup target) rate to `alpha` times it.

    With `warmup_target`, the rate first rises linearly from `initial_learning_rate` to
    `warmup_target` over `warmup_steps`, then decays over `decay_steps`.
    """

    _CONFIG_KEYS = (
        "initial_learning_rate", "decay_steps", "alpha", "name", "warmup_target", "warmup_steps",
    )

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: float,
        alpha: float = 0.0,
        name: str | None = None,
        warmup_target: float | None = None,
        warmup_steps: float = 0,
    ) -> None:
        owner = type(self).__name__
        self.initial_learning_rate = _real(owner, "initial_learning_rate", initial_learning_rate)
        self.decay_steps = _real(owner, "decay_steps", decay_steps)
        self.alpha = _real(owner, "alpha", alpha)
        self.name = _name(owner, name)
        self.warmup_target = (
            None if warmup_target is None else _real(owner, "warmup_target", warmup_target)
        )
        self.warmup_steps = _real(owner, "warmup_steps", warmup_steps)

    def _decay(self, s: np.float32, decay_steps: np.float32, from_lr: np.float32) -> np.float32:
        cosine = _HALF * (_ONE + np.cos(_PI * (s / decay_steps)))
        alpha = _F32(self.alpha)
        return from_lr * ((_ONE - alpha) * cosine + alpha)

    def _compute(self, step: int) -> np.float32:
        initial = _F32(self.initial_learning_rate)
        decay_steps = _F32(self.decay_steps)
        s = _step_f32(step)
        if self.warmup_target is None:
            return self._decay(np.minimum(s, decay_steps), decay_steps, initial)
        target = _F32(self.warmup_target)
        warmup_steps = _F32(self.warmup_steps)
        s = np.minimum(s, decay_steps + warmup_steps)
        if s < warmup_steps:
            return (target - initial) * (s / warmup_steps) + initial
        return self._decay(s - warmup_steps, decay_steps, target)


class CosineDecayRestarts(LearningRateSchedule):
    """SGDR: cosine decay restarted every period; period i is `t_mul**i` times longer
    and starts at `m_mul**i` times the initial rate."""

    _CONFIG_KEYS = ("initial_learning_rate", "first_decay_steps", "t_mul", "m_mul", "alpha", "name")

    def __init__(
        self,
        initial_learning_rate: float,
        first_decay_steps: float,
        t_mul: float = 2.0,
        m_mul: float = 1.0,
        alpha: float = 0.0,
        name: str | None = None,
    ) -> None:
        owner = type(self).__name__
        self.initial_learning_rate = _real(owner, "initial_learning_rate", initial_learning_rate)
        self.first_decay_steps = _real(owner, "first_decay_steps", first_decay_steps)
        self.t_mul = _real(owner, "t_mul", t_mul)
        self.m_mul = _real(owner, "m_mul", m_mul)
        self.alpha = _real(owner, "alpha", alpha)
        self.name = _name(owner, name)

    def _compute(self, step: int) -> np.float32:
        t_mul, m_mul, alpha = _F32(self.t_mul), _F32(self.m_mul), _F32(self.alpha)
        fraction = _step_f32(step) / _F32(self.first_decay_steps)
        if t_mul == _ONE:
            restart = np.floor(fraction)
            fraction = fraction - restart
        else:
            restart = np.floor(np.log(_ONE - fraction * (_ONE - t_mul)) / np.log(t_mul))
            done = (_ONE - np.power(t_mul, restart)) / (_ONE - t_mul)
            fraction = (fraction - done) / np.power(t_mul, restart)
        cosine = _HALF * np.power(m_mul, restart) * (_ONE + np.cos(_PI * fraction))
        return _F32(self.initial_learning_rate) * ((_ONE - alpha) * cosine + alpha)


SCHEDULES: dict[str, type[LearningRateSchedule]] = {
    cls.__name__: cls
    for cls in (
        ExponentialDecay,
        PiecewiseConstantDecay,
        PolynomialDecay,
        InverseTimeDecay,
        CosineDecay,
        CosineDecayRestarts,
    )
}

_COMPILED = frozenset(SCHEDULES.values())

_MODULES = ("keras.optimizers.schedules", "tf_keras.optimizers.schedules")


def is_compiled(schedule: Any) -> bool:
    """Whether the step computes `schedule` itself (one of the built-in classes, exactly:
    a subclass may override `__call__`); any other schedule is evaluated on the host."""
    return type(schedule) in _COMPILED


def evaluate(schedule: LearningRateSchedule, step: Any) -> np.float32:
    """`schedule(step)` as a float32 scalar, or a ValueError that names the schedule.

    This is how a custom schedule becomes the runtime learning rate of each step; the
    optimizer calls it at construction too (tf_keras' `_build_learning_rate` evaluates the
    schedule at iteration 0), so a broken schedule fails there, not at the first step.
    """
    value = schedule(step)
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "iuf":
        raise ValueError(
            f"learning_rate: schedule {type(schedule).__name__}({step}) returned {value!r}; a schedule "
            "must return a real scalar (a Python float, a NumPy or JAX scalar)"
        )
    return _F32(arr)


def serialize(schedule: LearningRateSchedule) -> dict[str, Any]:
    """The Keras serialization dict that tf_keras' `get_config` gives for a schedule: a
    built-in one names its Keras module; a custom one has module None and its class name
    as `registered_name` (tf_keras' optimizer_test `testGetAndFromConfig`)."""
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(f"serialize expects a LearningRateSchedule. Received: {schedule!r}")
    builtin = is_compiled(schedule)
    name = type(schedule).__name__
    return {
        "module": "keras.optimizers.schedules" if builtin else None,
        "class_name": name,
        "config": schedule.get_config(),
        "registered_name": None if builtin else name,
    }


def deserialize(d: dict[str, Any] | LearningRateSchedule,
                custom_objects: dict[str, Any] | None = None) -> LearningRateSchedule:
    """Rebuild a schedule from `serialize(...)`'s dict (Keras or tf_keras module, or none).

    `custom_objects` maps a class name (or registered name) to a user schedule class, as
    Keras' `deserialize(config, custom_objects)`; it is looked up before the built-ins.
    """
    if isinstance(d, LearningRateSchedule):
        return d
    if not isinstance(d, dict) or "class_name" not in d:
        raise ValueError(
            f"A serialized schedule must be a dict with 'class_name' and 'config'. Received: {d!r}"
        )
    class_name = d["class_name"]
    custom = dict(custom_objects or {})
    cls = custom.get(d.get("registered_name") or class_name, custom.get(class_name))
    if cls is None:
        module = d.get("module")
        if module is not None and module not in _MODULES:
            raise ValueError(
                f"Unknown schedule module {module!r}; expected one of {list(_MODULES)} or none."
            )
        cls = SCHEDULES.get(class_name)
    if cls is None:
        raise ValueError(
            f"Unknown learning rate schedule class_name={class_name!r}. Known schedules: "
            f"{', '.join(SCHEDULES)}. A custom schedule needs custom_objects={{{class_name!r}: <its class>}}."
        )
    if not (isinstance(cls, type) and issubclass(cls, LearningRateSchedule)):
        raise ValueError(
            f"custom_objects[{class_name!r}] must be a sgdgen LearningRateSchedule subclass. Received: {cls!r}"
        )
    config = d.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{class_name}: 'config' must be a dict. Received: config={config!r}")
    try:
        return cls.from_config(config)
    except TypeError as e:  # a missing or unknown key
        raise ValueError(f"{class_name}: invalid config {config!r}: {e}") from None
