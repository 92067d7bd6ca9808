"""Learning-rate schedules compiled into the step: each schedule class supplies its template's parameters.

A registry keyed by the schedule class (`sgdgen.frontend.schedules`): the template that
computes it and a function from an instance to that template's parameters (float32 hex
literals of its hyperparameters, SEMANTICS §5). Adding a schedule is one `@schedule`
entry here and one template; nothing else in the generator changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sgdgen.codegen import constants
from sgdgen.codegen.templating import GenerateError, f32_literal as _f32, render
from sgdgen.frontend import schedules as S


@dataclass(frozen=True)
class ScheduleEmitter:
    """How one schedule class becomes a @learning_rate function."""

    template: str
    params: Callable[[Any], dict[str, Any]]


#: schedule class -> its emitter. Exact classes: a subclass may override `__call__`, so it is
#: not compiled as its base.
SCHEDULES: dict[type, ScheduleEmitter] = {}


def schedule(cls: type, template: str) -> Callable[[Callable[[Any], dict[str, Any]]], Callable[[Any], dict[str, Any]]]:
    """Decorator: registers `params(schedule) -> template parameters` for `cls`."""

    def wrap(params: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
        SCHEDULES[cls] = ScheduleEmitter(template, params)
        return params

    return wrap


def _decay(s: Any) -> dict[str, Any]:
    return dict(initial_learning_rate=_f32(s.initial_learning_rate), decay_steps=_f32(s.decay_steps),
                decay_rate=_f32(s.decay_rate), staircase=bool(s.staircase))


schedule(S.ExponentialDecay, "lr_exponential_decay")(_decay)
schedule(S.InverseTimeDecay, "lr_inverse_time_decay")(_decay)


@schedule(S.PiecewiseConstantDecay, "lr_piecewise_constant_decay")
def _piecewise(s: Any) -> dict[str, Any]:
    return dict(boundaries=[int(b) for b in s.boundaries], values=[_f32(v) for v in s.values])


@schedule(S.PolynomialDecay, "lr_polynomial_decay")
def _polynomial(s: Any) -> dict[str, Any]:
    return dict(initial_learning_rate=_f32(s.initial_learning_rate), end_learning_rate=_f32(s.end_learning_rate),
                power=_f32(s.power), decay_steps=_f32(s.decay_steps), cycle=bool(s.cycle))


@schedule(S.CosineDecay, "lr_cosine_decay")
def _cosine(s: Any) -> dict[str, Any]:
    warmup = s.warmup_target is not None
    return dict(initial_learning_rate=_f32(s.initial_learning_rate), decay_steps=_f32(s.decay_steps),
                pi=_f32(math.pi), alpha=_f32(s.alpha), warmup=warmup,
                warmup_target=_f32(s.warmup_target) if warmup else None, warmup_steps=_f32(s.warmup_steps))


@schedule(S.CosineDecayRestarts, "lr_cosine_decay_restarts")
def _cosine_restarts(s: Any) -> dict[str, Any]:
    return dict(initial_learning_rate=_f32(s.initial_learning_rate), first_decay_steps=_f32(s.first_decay_steps),
                t_mul=_f32(s.t_mul), m_mul=_f32(s.m_mul), alpha=_f32(s.alpha), pi=_f32(math.pi),
                geometric=constants.to_bits(s.t_mul, "float32") != constants.to_bits(1.0, "float32"))


def render_schedule(schedule: Any, fn: str = "learning_rate") -> str:
    """The @learning_rate(iterations) -> f32 function of a schedule."""
    emitter = SCHEDULES.get(type(schedule))
    if emitter is None:
        raise GenerateError(
            f"learning_rate: schedule {type(schedule).__name__} cannot be compiled into the step; use one of "
            f"{sorted(c.__name__ for c in SCHEDULES)}, a float, or a callable (evaluated once, at construction)"
        )
    return render(emitter.template, fn=fn, **emitter.params(schedule))
