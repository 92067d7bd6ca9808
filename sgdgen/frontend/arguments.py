"""Argument checks shared by the optimizer and the schedules: an unknown or missing name
is reported with the owner (`sgdgen.SGD`, `ExponentialDecay`), every valid name, and the
closest valid name (difflib), instead of Python's or tf_keras' internal wording; and the one
coercion of numbers and flags (each caller raises its own error, with its own wording)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["as_flag", "as_real", "check_names", "parameters"]


def as_real(value: Any) -> int | float | None:
    """`value` as a Python int or float (from a Python number, a NumPy scalar, a 0-d array, or an
    object with `__float__` such as an ml_dtypes scalar), or None when it is not a real number.

    Integers stay integers (tf_keras reports `momentum=1` as 1). Bools, strings and arrays are
    not numbers here: a bool where a number belongs is almost surely a mistake."""
    import numpy as np

    if isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    if type(value) in (int, float):
        return value
    try:
        arr = np.asarray(value)
    except Exception:
        arr = None
    if arr is not None and arr.ndim == 0 and arr.dtype.kind in "iuf":
        return arr.item()
    if arr is None or arr.ndim == 0:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def as_flag(value: Any, *, allow_01: bool = False) -> bool | int | None:
    """A Python bool from a Python or NumPy bool (with `allow_01`, the ints 0 and 1 as given,
    as tf_keras accepts them for `nesterov`), or None when `value` is not a flag."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if allow_01 and type(value) is int and value in (0, 1):
        return value
    return None


def parameters(fn: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """(every named parameter, the required ones) of `fn`, without self/*args/**kwargs."""
    names, required = [], []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        names.append(p.name)
        if p.default is p.empty:
            required.append(p.name)
    return names, required


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def check_names(owner: str, given: Iterable[str], valid: Sequence[str], required: Sequence[str] = (),
                *, kind: str = "argument") -> None:
    """Raises TypeError naming `owner` for the first unknown name (with the closest valid
    one) or the first missing required name; lists the valid names either way."""
    given = list(given)
    listing = f"Valid {kind}s of {owner}: {', '.join(valid)}."
    for name in given:
        if name not in valid:
            raise TypeError(f"`{name}` is not a valid {kind} of {owner}.{_suggest(name, valid)} {listing}")
    for name in required:
        if name not in given:
            raise TypeError(f"{owner} needs the {kind} `{name}`, which is missing. {listing}")
