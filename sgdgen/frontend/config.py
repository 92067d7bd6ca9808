"""SGDConfig: the validated constructor arguments of the DTensor SGD (SEMANTICS.md §1, §2, §8).

`SGDConfig.create` takes the seed signature plus the modern flat arguments, merges the
`GradientsClipOption` / `EMAOption` objects (decision 13), validates in tf_keras' order
with tf_keras' messages, and freezes the result. `get_config` / `from_config` use the
Keras keys, so a tf_keras SGD config reads here and the CLI's CONFIG.json files are
exactly `get_config()` dicts.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgdgen.frontend import schedules
from sgdgen.frontend.arguments import as_flag, as_real, check_names
from sgdgen.frontend.schedules import LearningRateSchedule
from sgdgen.frontend.buckets import DEFAULT_THRESHOLD

__all__ = ["GradientsClipOption", "EMAOption", "SGDConfig"]


@dataclass
class GradientsClipOption:
    """Clip settings as one object (the seed's `gradients_clip_option`); not validated here."""

    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None


@dataclass
class EMAOption:
    """EMA settings as one object (the seed's `ema_option`); note the frequency default 100."""

    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int | None = 100


class _Unset:
    """Marks a flat argument that was not passed, to tell it from an explicit default."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()

_LEGACY_KWARGS = ("decay", "gradient_aggregator", "gradient_transformers")

_CONFIG_KEYS = (
    "name", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "use_ema",
    "ema_momentum", "ema_overwrite_frequency", "jit_compile", "is_legacy_optimizer",
    "learning_rate", "momentum", "nesterov",
)


def _number(arg: str, value: Any) -> int | float:
    """A real-number argument as a Python int or float (`arguments.as_real`), else TypeError."""
    number = as_real(value)
    if number is None:
        raise TypeError(
            f"`{arg}` must be a real number (a Python int or float, a NumPy scalar or a 0-d array). "
            f"Received: {arg}={value!r}"
        )
    return number


def _finite(arg: str, value: int | float | None, *, float32: bool = False) -> None:
    """Refuses NaN and +-Inf, which would make every variable NaN at the next step.

    With `float32`, also refuses a number that rounds to +-inf in float32: the learning
    rate, momentum and weight decay reach the program as float32 (SEMANTICS §6), so 1e39
    there is inf. None (an unset option) passes.
    """
    if value is None:
        return
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond the double range
        as_float = math.inf
    with np.errstate(over="ignore"):
        rounded = float(np.float32(as_float)) if float32 else as_float
    if not math.isfinite(rounded):
        where = " (inf in float32, the precision the step uses for it)" if math.isfinite(as_float) else ""
        raise ValueError(
            f"`{arg}` must be a finite number: NaN or an infinite value turns the state it touches into "
            f"NaN at the next step. Received: {arg}={value!r}{where}"
        )


def _optional_number(arg: str, value: Any) -> int | float | None:
    return None if value is None else _number(arg, value)


def _flag(arg: str, value: Any) -> Any:
    """A bool-valued argument: Python/NumPy bool or the ints 0 and 1, stored as given."""
    flag = as_flag(value, allow_01=True)
    if flag is None:
        raise TypeError(f"`{arg}` must be a bool. Received: {arg}={value!r}")
    return flag


def _learning_rate(value: Any) -> float | LearningRateSchedule:
    """Decision 16 and §3: keep a schedule; round a number to float32; call a callable once."""
    if isinstance(value, LearningRateSchedule):
        return value
    if callable(value):  # tf.Variable(callable) calls it once, as the initial value
        value = value()
        if isinstance(value, LearningRateSchedule) or callable(value):
            raise TypeError(
                "A callable `learning_rate` must return a number. "
                f"Received: learning_rate() = {value!r}"
            )
    try:
        number = _number("learning_rate", value)
    except TypeError:
        raise TypeError(
            "`learning_rate` must be a float, a LearningRateSchedule or a callable returning "
            f"a float. Received: learning_rate={value!r}"
        ) from None
    _finite("learning_rate", number, float32=True)
    return float(np.float32(number))


def _merge(option: Any, option_arg: str, option_type: type, flat: dict[str, Any],
           defaults: dict[str, Any]) -> dict[str, Any]:
    """Decision 13: an option object supplies all its fields; a field given both ways fails."""
    if option is None:
        return {k: defaults[k] if v is _UNSET else v for k, v in flat.items()}
    if not isinstance(option, option_type):
        raise TypeError(
            f"`{option_arg}` must be a {option_type.__name__} or None. "
            f"Received: {option_arg}={option!r}"
        )
    for k, v in flat.items():
        if v is not _UNSET:
            raise ValueError(
                f"`{k}` was given both as an argument and in `{option_arg}`; give it one way. "
                f"Received: {k}={v!r}, {option_arg}.{k}={getattr(option, k)!r}"
            )
    return {k: getattr(option, k) for k in flat}


@dataclass(frozen=True)
class SGDConfig:
    """Every constructor argument of the DTensor SGD, validated and frozen.

    Build it with `SGDConfig.create(...)` (or `from_config`); the plain constructor does no
    validation. `learning_rate` is a schedule or the Python float of the float32 value.
    """

    name: str = "SGD"
    learning_rate: float | LearningRateSchedule = float(np.float32(0.01))
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int | None = None
    jit_compile: bool = False
    amsgrad: bool = False
    #: the data-parallel mesh axis over which optimizer slots are sharded (ZeRO-1/2), or None
    shard_update_over: str | None = None
    skip_nonfinite: bool = False
    #: keep small replicated variables' state (and values) in flat buffers (sgdgen.frontend.buckets)
    buckets: bool = False
    #: variables of at least this many elements keep their own buffers (with `buckets`)
    bucket_threshold: int = DEFAULT_THRESHOLD

    @classmethod
    def create(
        cls,
        learning_rate: Any = 0.01,
        momentum: Any = 0.0,
        nesterov: bool = False,
        amsgrad: bool = False,
        gradients_clip_option: GradientsClipOption | None = None,
        ema_option: EMAOption | None = None,
        jit_compile: bool = False,
        name: str = "SGD",
        *,
        weight_decay: Any = _UNSET,
        clipnorm: Any = _UNSET,
        clipvalue: Any = _UNSET,
        global_clipnorm: Any = _UNSET,
        use_ema: Any = _UNSET,
        ema_momentum: Any = _UNSET,
        ema_overwrite_frequency: Any = _UNSET,
        shard_update_over: str | None = None,
        skip_nonfinite: Any = False,
        buckets: Any = False,
        bucket_threshold: Any = DEFAULT_THRESHOLD,
        **kwargs: Any,
    ) -> SGDConfig:
        """Merge, validate (in tf_keras' order, §2) and freeze the SGD constructor arguments."""
        clip = _merge(
            gradients_clip_option, "gradients_clip_option", GradientsClipOption,
            {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm},
            {"clipnorm": None, "clipvalue": None, "global_clipnorm": None},
        )
        ema = _merge(
            ema_option, "ema_option", EMAOption,
            {"use_ema": use_ema, "ema_momentum": ema_momentum,
             "ema_overwrite_frequency": ema_overwrite_frequency},
            {"use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None},
        )
        if not isinstance(name, str):
            raise TypeError(f"`name` must be a string. Received: name={name!r}")
        weight_decay = None if weight_decay is _UNSET else _optional_number("weight_decay", weight_decay)
        clip = {k: _optional_number(k, v) for k, v in clip.items()}
        use_ema = _flag("use_ema", ema["use_ema"])
        ema_momentum = _number("ema_momentum", ema["ema_momentum"])
        _finite("weight_decay", weight_decay, float32=True)
        for k, v in clip.items():
            _finite(k, v)  # converted to the variable dtype from the double (SEMANTICS §6)
        frequency = ema["ema_overwrite_frequency"]

        # §2.1: the EMA checks run only when use_ema is truthy.
        if use_ema:
            if ema_momentum > 1 or ema_momentum < 0:
                raise ValueError(
                    "`ema_momentum` must be in the range [0, 1]. "
                    f"Received: ema_momentum={ema_momentum}"
                )
            if frequency and (not isinstance(frequency, int) or frequency < 1):
                raise ValueError(
                    "`ema_overwrite_frequency` must be an integer > 1 or None. "
                    f"Received: ema_overwrite_frequency={frequency}"
                )
        _finite("ema_momentum", ema_momentum)  # after tf_keras' range check, which keeps its message
        # §2.2: only clipnorm with global_clipnorm is an error; clipvalue beside them is ignored.
        if clip["clipnorm"] is not None and clip["global_clipnorm"] is not None:
            raise ValueError(
                "At most one of `clipnorm` and `global_clipnorm` can be set. "
                f"Received: clipnorm={clip['clipnorm']}, "
                f"global_clipnorm={clip['global_clipnorm']}."
            )
        _process_kwargs(kwargs)  # §2.3
        if shard_update_over is not None and (not isinstance(shard_update_over, str) or not shard_update_over):
            raise ValueError("`shard_update_over` must be the name of a mesh axis (e.g. 'batch') or None. "
                             f"Received: shard_update_over={shard_update_over!r}")
        lr = _learning_rate(learning_rate)  # §2.4
        momentum = _number("momentum", momentum)
        if momentum < 0 or momentum > 1:
            raise ValueError("`momentum` must be between [0, 1].")
        _finite("momentum", momentum)  # NaN passes the range check above
        nesterov = _flag("nesterov", nesterov)
        jit_compile = _flag("jit_compile", jit_compile)
        skip_nonfinite = _flag("skip_nonfinite", skip_nonfinite)
        buckets = _flag("buckets", buckets)
        if isinstance(bucket_threshold, bool) or not isinstance(bucket_threshold, (int, np.integer)) or \
                bucket_threshold < 1:
            raise ValueError("`bucket_threshold` must be a positive integer number of elements (variables that "
                             f"large keep their own buffers). Received: bucket_threshold={bucket_threshold!r}")
        if _flag("amsgrad", amsgrad):
            warnings.warn("`amsgrad` has no effect on SGD; it is accepted for compatibility.",
                          UserWarning, stacklevel=2)
        return cls(
            name=name, learning_rate=lr, momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=frequency, jit_compile=jit_compile, amsgrad=amsgrad,
            shard_update_over=shard_update_over, skip_nonfinite=bool(skip_nonfinite), buckets=bool(buckets),
            bucket_threshold=int(bucket_threshold), **clip,
        )

    def get_config(self) -> dict[str, Any]:
        """tf_keras' SGD `get_config` (§8): its keys in its order; JSON-serialisable."""
        lr = self.learning_rate
        config = {k: getattr(self, k, None) for k in _CONFIG_KEYS}
        config["is_legacy_optimizer"] = False
        config["learning_rate"] = schedules.serialize(lr) if self.lr_is_schedule else float(lr)
        if self.shard_update_over is not None:  # sgdgen's own key: absent unless set (tf_keras' dict otherwise)
            config["shard_update_over"] = self.shard_update_over
        if self.skip_nonfinite:  # sgdgen's own key, only when set: a default config stays tf_keras' dict
            config["skip_nonfinite"] = True
        if self.buckets:  # sgdgen's own keys, only when set
            config["buckets"] = True
        if self.bucket_threshold != DEFAULT_THRESHOLD:
            config["bucket_threshold"] = self.bucket_threshold
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SGDConfig:
        """Inverse of `get_config`: a dict learning rate is deserialized as a schedule."""
        config = dict(config)
        config.pop("is_legacy_optimizer", None)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls.create(**config)

    def to_json(self, indent: int | None = 2) -> str:
        """`get_config()` as JSON text (the CLI's CONFIG.json)."""
        return json.dumps(self.get_config(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SGDConfig:
        """Parse a CONFIG.json text; any bad value raises ValueError naming the field."""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Optimizer config is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"Optimizer config must be a JSON object. Received: {config!r}")
        try:
            return cls.from_config(config)
        except TypeError as e:
            raise ValueError(f"Invalid optimizer config: {e}") from e

    @property
    def lr_is_schedule(self) -> bool:
        """Whether the learning rate is computed from `iterations` by a schedule."""
        return isinstance(self.learning_rate, LearningRateSchedule)

    @property
    def clip_mode(self) -> str | None:
        """The active clip (decision 7): clipnorm > global_clipnorm > clipvalue; <= 0 disables."""
        for mode in ("clipnorm", "global_clipnorm", "clipvalue"):
            value = getattr(self, mode)
            if value and value > 0:
                return mode
        return None

    @property
    def clip_value(self) -> float | None:
        """The value of the active clip, or None."""
        mode = self.clip_mode
        return None if mode is None else getattr(self, mode)

    @property
    def ema_overwrite_every(self) -> int | None:
        """Overwrite the weights with the EMA when `(iterations + 1) % this == 0`; None: never."""
        if self.use_ema and self.ema_overwrite_frequency:
            return int(self.ema_overwrite_frequency)
        return None


def _sgd_arguments() -> list[str]:
    """The arguments of `sgdgen.SGD`: SGDConfig.create's, plus `mesh`, which SGD itself takes."""
    names = [n for n in inspect.signature(SGDConfig.create).parameters if n not in ("cls", "kwargs")]
    names.insert(names.index("name") + 1, "mesh")
    return names


_LEGACY_FIX = {
    "decay": "use a learning-rate schedule instead, e.g. sgdgen.schedules.InverseTimeDecay(lr, 1, decay)",
    "gradient_aggregator": "aggregate the gradients yourself before apply_gradients",
    "gradient_transformers": "transform the gradients yourself before apply_gradients "
                             "(clipping: clipnorm, clipvalue or global_clipnorm)",
}


def _process_kwargs(kwargs: dict[str, Any]) -> None:
    """tf_keras `_process_kwargs` (§1): `lr` warns and is ignored; legacy names fail; others too.

    The behaviour is tf_keras'; the messages speak of sgdgen's API and say what to do.
    """
    kwargs = dict(kwargs)
    kwargs.pop("is_legacy_optimizer", None)
    if kwargs.pop("lr", None):
        warnings.warn(
            "`lr` is deprecated and ignored by sgdgen.SGD (as by tf_keras' optimizer); "
            "use `learning_rate`.",
            UserWarning, stacklevel=3,
        )
    for k in kwargs:
        if k in _LEGACY_KWARGS:
            raise ValueError(
                f"`{k}` is deprecated (it was removed from the Keras optimizers) and sgdgen.SGD does not "
                f"support it: {_LEGACY_FIX[k]}."
            )
    check_names("sgdgen.SGD", kwargs, _sgd_arguments())
