"""The one table of element types sgdgen knows, and the conversions every stage asks of it.

Variables are floating (float16, bfloat16, float32, float64); the step counter is an integer
(int64 in the program; int32 accepted at the API boundary). For each: the NumPy dtype (bfloat16
through ml_dtypes), the MLIR element type, and for floats the wide type their norms accumulate
in (docs/numerics.md: float32 for 16-bit types, float64 for float32 and float64).
`sgdgen.reference` keeps a table of its own on purpose: the oracle does not share code with
what it checks.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from sgdgen.errors import SpecError

#: floating dtypes a variable may have, by canonical name, with the MLIR element type.
MLIR_ELEMENT_TYPES: dict[str, str] = {
    "float16": "f16",
    "bfloat16": "bf16",
    "float32": "f32",
    "float64": "f64",
}
#: integer dtypes of step counters, with the MLIR element type.
COUNTER_ELEMENT_TYPES: dict[str, str] = {"int32": "i32", "int64": "i64"}
#: the wide type that accumulates the norm of a variable of each MLIR element type.
WIDE: dict[str, str] = {"f16": "f32", "bf16": "f32", "f32": "f64", "f64": "f64"}

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def dtype_name(dtype: Any) -> str:
    """The canonical name of any NumPy-compatible dtype ("bfloat16" for ml_dtypes' type)."""
    dt = np.dtype(dtype)
    return "bfloat16" if dt == _BFLOAT16 else dt.name


def canonical_dtype(dtype: Any, *, what: str = "variable") -> str:
    """Returns the canonical name of a floating dtype, or raises naming `what`."""
    try:
        name = dtype_name(dtype)
    except TypeError as e:
        raise SpecError(f"{what}: unknown dtype {dtype!r}; use one of {sorted(MLIR_ELEMENT_TYPES)}") from e
    if name not in MLIR_ELEMENT_TYPES:
        raise SpecError(
            f"{what}: dtype {name} is not supported; SGD updates floating variables only "
            f"({', '.join(sorted(MLIR_ELEMENT_TYPES))}). Cast the variable to a float type."
        )
    return name


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a canonical dtype name (floats and counters; bfloat16 via ml_dtypes)."""
    return _BFLOAT16 if name == "bfloat16" else np.dtype(name)


def mlir_element_type(name: str) -> str:
    """The MLIR element type of a canonical dtype name (a float or a counter)."""
    et = MLIR_ELEMENT_TYPES.get(name) or COUNTER_ELEMENT_TYPES.get(name)
    if et is None:
        raise SpecError(f"dtype {name!r} has no MLIR element type in sgdgen; use one of "
                        f"{sorted({**MLIR_ELEMENT_TYPES, **COUNTER_ELEMENT_TYPES})}")
    return et


__all__ = ["COUNTER_ELEMENT_TYPES", "MLIR_ELEMENT_TYPES", "WIDE", "canonical_dtype", "dtype_name",
           "mlir_element_type", "numpy_dtype"]
