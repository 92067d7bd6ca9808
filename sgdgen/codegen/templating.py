"""Rendering the stage templates, and the builder that collects a module's functions and @main.

The pieces every emitter shares: `render` (templates/*.mlir.j2 with strict parameters and
the attribute names of `sgdgen.passes.attrs`), `hex_literal` (exact constants), the
`GenerateError` every check raises, and `Builder`, which renders each stage function once
and collects the lines of @main.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jinja2

from sgdgen.errors import GenerateError
from sgdgen.codegen import constants
from sgdgen.passes import attrs


def hex_literal(value: float, dtype: str, *, via_float32: bool = False) -> str:
    """The exact bit pattern of `value` in `dtype`, as an MLIR hex literal (`0x3F800000`).

    `via_float32` rounds to float32 first, as `tf.cast(python_float, T)` does for the
    learning rate, momentum and weight decay; without it the double converts straight to T.
    The rounding is `sgdgen.codegen.constants`' own, independent of the reference's casts.
    A Python float is cached on its bits (0.0 and -0.0 would be one key of a plain cache): the
    generator asks for the same few constants once per variable per stage. Other reals (ints,
    fractions, NumPy scalars) are rounded from their exact value, uncached.
    """
    if type(value) is float:
        return _hex_literal_of_bits(struct.unpack("<Q", struct.pack("<d", value))[0], dtype, via_float32)
    return _hex_of(value, dtype, via_float32)


def _hex_of(value: Any, dtype: str, via_float32: bool) -> str:
    return constants.hex_bits((constants.cast_bits if via_float32 else constants.to_bits)(value, dtype), dtype)


@cache
def _hex_literal_of_bits(bits: int, dtype: str, via_float32: bool) -> str:
    return _hex_of(struct.unpack("<d", struct.pack("<Q", bits))[0], dtype, via_float32)


def f32_literal(value: float) -> str:
    """A float32 constant of the schedule arithmetic (SEMANTICS §5), as a hex literal."""
    return hex_literal(float(value), "float32")


@cache
def _environment() -> jinja2.Environment:
    root = resources.files("sgdgen.templates")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.globals.update(stage_attributes=attrs.stage_attributes, STATE_COUNT=attrs.STATE_COUNT)
    return env


def render(template: str, **params: Any) -> str:
    """Renders templates/<template>.mlir.j2 with `params` (missing params are errors)."""
    return _environment().get_template(f"{template}.mlir.j2").render(**params).strip() + "\n"


def template_names() -> list[str]:
    """Every stage template shipped with the package."""
    root = resources.files("sgdgen.templates")
    return sorted(p.name.removesuffix(".mlir.j2") for p in root.iterdir() if p.name.endswith(".mlir.j2"))


@dataclass
class Builder:
    """Collects stage functions (each rendered once, by symbol name) and the lines of @main."""

    functions: dict[str, str] = field(default_factory=dict)
    body: list[str] = field(default_factory=list)

    def stage(self, fn: str, template: str, **params: Any) -> str:
        """The symbol `fn`, rendering `template` for it the first time it is asked for."""
        if fn not in self.functions:
            self.functions[fn] = render(template, fn=fn, **params)
        return fn

    def emit(self, line: str) -> None:
        self.body.append("    " + line)

    def call(self, results: Sequence[str], fn: str, args: Sequence[str], arg_types: Sequence[str],
             result_types: Sequence[str]) -> None:
        lhs = ", ".join(results)
        rt = result_types[0] if len(result_types) == 1 else "(" + ", ".join(result_types) + ")"
        self.emit(f"{lhs} = func.call @{fn}({', '.join(args)}) : ({', '.join(arg_types)}) -> {rt}")
