"""Keras learning-rate schedules with tf_keras 2.21 semantics, evaluated in NumPy float32.

Each schedule mirrors its `tf_keras.optimizers.schedules` namesake (SEMANTICS.md §5):
the same constructor arguments, stored as attributes of the same names (the StableHLO
generator reads them), the same `get_config` keys in Keras order, and `__call__(step)`
giving the float32 value at an iteration count. Every intermediate is `np.float32`,
whatever the Python types of the arguments, so this module is the host-side oracle for
the schedule arithmetic the compiled step does on device.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import numpy as np

from sgdgen.frontend.arguments import check_names, parameters

__all__ = [
    "LearningRateSchedule",
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
    "SCHEDULES",
    "serialize",
    "deserialize",
]

_F32 = np.float32
_ONE = _F32(1.0)
_HALF = _F32(0.5)
_PI = _F32(math.pi)  # tf.constant(math.pi, float32)


def _real(owner: str, arg: str, value: Any) -> int | float:
    """Return `value` as a Python int or float; NumPy scalars and 0-d arrays are unwrapped.

    Stored values stay JSON-serialisable, so `get_config` round-trips through JSON.
    """
    if not isinstance(value, (bool, np.bool_)):
        if type(value) in (int, float):
            return value
        arr = np.asarray(value) if isinstance(value, (int, float, np.generic, np.ndarray)) else None
        if arr is not None and arr.ndim == 0 and arr.dtype.kind in "iuf":
            return arr.item()
    raise ValueError(f"{owner}: `{arg}` must be a real number. Received: {arg}={value!r}")


def _positive(owner: str, arg: str, value: Any) -> int | float:
    """A real number > 0 (a step count used as a divisor)."""
    value = _real(owner, arg, value)
    if not value > 0:
        raise ValueError(f"{owner}: `{arg}` must be > 0. Received: {arg}={value!r}")
    return value


def _flag(owner: str, arg: str, value: Any) -> bool:
    """A Python or NumPy bool, stored as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: `{arg}` must be a bool. Received: {arg}={value!r}")
    return bool(value)


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
        self.decay_steps = _positive(owner, "decay_steps", decay_steps)
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
        self.decay_steps = _positive(owner, "decay_steps", decay_steps)
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
        self.decay_steps = _positive(owner, "decay_steps", decay_steps)
        self.alpha = _real(owner, "alpha", alpha)
        self.name = _name(owner, name)
        self.warmup_target = (
            None if warmup_target is None else _real(owner, "warmup_target", warmup_target)
        )
        self.warmup_steps = _real(owner, "warmup_steps", warmup_steps)
        if self.warmup_steps < 0:
            raise ValueError(f"{owner}: `warmup_steps` must be >= 0. Received: warmup_steps={warmup_steps!r}")

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
        self.first_decay_steps = _positive(owner, "first_decay_steps", first_decay_steps)
        self.t_mul = _positive(owner, "t_mul", t_mul)
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

_MODULES = ("keras.optimizers.schedules", "tf_keras.optimizers.schedules")


def serialize(schedule: LearningRateSchedule) -> dict[str, Any]:
    """The Keras serialization dict that tf_keras' `get_config` gives for a schedule."""
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(f"serialize expects a LearningRateSchedule. Received: {schedule!r}")
    return {
        "module": "keras.optimizers.schedules",
        "class_name": type(schedule).__name__,
        "config": schedule.get_config(),
        "registered_name": None,
    }


def deserialize(d: dict[str, Any] | LearningRateSchedule) -> LearningRateSchedule:
    """Rebuild a schedule from `serialize(...)`'s dict (Keras or tf_keras module, or none)."""
    if isinstance(d, LearningRateSchedule):
        return d
    if not isinstance(d, dict) or "class_name" not in d:
        raise ValueError(
            f"A serialized schedule must be a dict with 'class_name' and 'config'. Received: {d!r}"
        )
    module = d.get("module")
    if module is not None and module not in _MODULES:
        raise ValueError(
            f"Unknown schedule module {module!r}; expected one of {list(_MODULES)} or none."
        )
    class_name = d["class_name"]
    cls = SCHEDULES.get(class_name)
    if cls is None:
        raise ValueError(
            f"Unknown learning rate schedule class_name={class_name!r}. "
            f"Known schedules: {', '.join(SCHEDULES)}."
        )
    config = d.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{class_name}: 'config' must be a dict. Received: config={config!r}")
    try:
        return cls.from_config(config)
    except TypeError as e:  # a missing or unknown key
        raise ValueError(f"{class_name}: invalid config {config!r}: {e}") from None
