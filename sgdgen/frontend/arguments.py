"""Argument checks shared by the optimizer and the schedules: an unknown or missing name
is reported with the owner (`sgdgen.SGD`, `ExponentialDecay`), every valid name, and the
closest valid name (difflib), instead of Python's or tf_keras' internal wording."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["check_names", "parameters"]


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
