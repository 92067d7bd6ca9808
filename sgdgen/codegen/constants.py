"""The generator's numeric constants: exact IEEE-754 rounding of hyperparameters to bit patterns.

The step's constants are written into the module as hex bit patterns (`0x3F800000`), so
what matters is the exact bits of each rounded value. They are computed here from the
exact rational value of the input (a Python int or float, a NumPy scalar) with integer
arithmetic, independently of NumPy's and ml_dtypes' casts, so that `sgdgen.reference`
(which uses those casts) is a real cross-check: a rounding bug cannot sit in both the
generator and its oracle.

Rounding is IEEE round-to-nearest, ties to even, with gradual underflow (subnormals) and
overflow to a signed infinity; NaN becomes the quiet NaN of the format with the input's
sign (payloads are not kept: no hyperparameter is a NaN with a payload).

- `to_bits(x, dtype)`: `T(x)`, one rounding of the exact value to T (SEMANTICS: Python
  scalars in tensor arithmetic, such as `ema_momentum`, clip constants, 0.5 and 2.0);
- `cast_bits(x, dtype)`: `T(float32(x))`, the `tf.cast` rule for the learning rate, momentum
  and weight decay: rounded to float32 first, then to T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Format:
    """An IEEE-754 binary interchange format: exponent and fraction (stored mantissa) widths."""

    name: str
    exponent_bits: int
    fraction_bits: int

    @property
    def width(self) -> int:
        """Total bits: sign + exponent + fraction."""
        return 1 + self.exponent_bits + self.fraction_bits

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (and the scale of the subnormals)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return self.bias

    @property
    def exponent_mask(self) -> int:
        return ((1 << self.exponent_bits) - 1) << self.fraction_bits

    @property
    def sign_bit(self) -> int:
        return 1 << (self.width - 1)


#: The floating formats a variable may have, by sgdgen dtype name.
FORMATS: dict[str, Format] = {
    "float16": Format("float16", 5, 10),
    "bfloat16": Format("bfloat16", 8, 7),
    "float32": Format("float32", 8, 23),
    "float64": Format("float64", 11, 52),
}


def format_of(dtype: str) -> Format:
    """The IEEE format of a dtype name (`float16`, `bfloat16`, `float32`, `float64`)."""
    try:
        return FORMATS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no floating format; use one of {sorted(FORMATS)}") from None


def exact_value(x: Any) -> Fraction | float:
    """The exact value of a real scalar: a Fraction when finite, else the float inf or nan.

    Python ints stay exact (no detour through a double); floats and NumPy floating scalars
    are exact binary fractions already.
    """
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"expected a real number, got the bool {x!r}")
    if isinstance(x, np.ndarray):
        if x.ndim:
            raise TypeError(f"expected a scalar, got an array of shape {x.shape}")
        x = x[()]
    if isinstance(x, (int, np.integer)):
        return Fraction(int(x))
    f = float(x)  # exact for every NumPy floating type up to float64
    return Fraction(f) if math.isfinite(f) else f


def _nan_bits(fmt: Format, negative: bool) -> int:
    quiet = 1 << (fmt.fraction_bits - 1)
    return (fmt.sign_bit if negative else 0) | fmt.exponent_mask | quiet


def round_bits(value: Fraction | float, fmt: Format) -> int:
    """The bit pattern of `value` rounded to nearest-even in `fmt` (an exact Fraction, inf or nan)."""
    if isinstance(value, float):  # inf or nan
        negative = math.copysign(1.0, value) < 0
        if math.isnan(value):
            return _nan_bits(fmt, negative)
        return (fmt.sign_bit if negative else 0) | fmt.exponent_mask
    sign = fmt.sign_bit if value < 0 else 0
    a = abs(value)
    if a == 0:
        return 0  # a Fraction zero has no sign; `to_bits` keeps the sign of -0.0
    n, d = a.numerator, a.denominator
    # e = floor(log2(a)), from the bit lengths and one comparison.
    e = n.bit_length() - d.bit_length()
    if (n << max(0, -e)) < (d << max(0, e)):
        e -= 1
    e = max(e, fmt.emin)  # below the normal range the quantum stays 2^(emin - p)
    p = fmt.fraction_bits
    # mantissa = a / 2^(e - p), rounded to an integer, ties to even.
    shift = p - e
    num, den = (n << shift, d) if shift >= 0 else (n, d << -shift)
    m, rem = divmod(num, den)
    if 2 * rem > den or (2 * rem == den and m & 1):
        m += 1
    if m >> (p + 1):  # rounding carried into a new binade
        m >>= 1
        e += 1
    if e > fmt.emax:
        return sign | fmt.exponent_mask
    if m >> p:  # normal
        return sign | ((e + fmt.bias) << p) | (m - (1 << p))
    return sign | m  # subnormal (or zero after underflow)


def bits_value(bits: int, fmt: Format) -> Fraction | float:
    """The value a bit pattern of `fmt` holds: an exact Fraction, or inf / nan as floats."""
    negative = bool(bits & fmt.sign_bit)
    biased = (bits & fmt.exponent_mask) >> fmt.fraction_bits
    frac = bits & ((1 << fmt.fraction_bits) - 1)
    if biased == (1 << fmt.exponent_bits) - 1:
        special = math.nan if frac else math.inf
        return -special if negative else special
    if biased == 0:
        mag = Fraction(frac) * Fraction(2) ** (fmt.emin - fmt.fraction_bits)
    else:
        mag = Fraction(frac + (1 << fmt.fraction_bits)) * Fraction(2) ** (biased - fmt.bias - fmt.fraction_bits)
    return -mag if negative else mag


def _round_signed(x: Any, fmt: Format) -> int:
    """`round_bits` of `x`, keeping the sign of a negative zero (which a Fraction cannot hold)."""
    value = exact_value(x)
    if value == 0 and not isinstance(x, (int, np.integer)) and math.copysign(1.0, float(x)) < 0:
        return fmt.sign_bit
    return round_bits(value, fmt)


def to_bits(x: Any, dtype: str) -> int:
    """`T(x)`: the bits of the real `x` rounded once to `dtype`."""
    return _round_signed(x, format_of(dtype))


def cast_bits(x: Any, dtype: str) -> int:
    """`T(float32(x))`: rounded to float32, then that float32 value rounded to `dtype`."""
    f32 = FORMATS["float32"]
    bits32 = _round_signed(x, f32)
    value = bits_value(bits32, f32)
    if isinstance(value, Fraction) and value == 0:
        return format_of(dtype).sign_bit if bits32 & f32.sign_bit else 0
    return round_bits(value, format_of(dtype))


def hex_bits(bits: int, dtype: str) -> str:
    """An MLIR hex literal of a bit pattern, zero-padded to the width of `dtype` (`0x3F800000`)."""
    return f"0x{bits:0{format_of(dtype).width // 4}X}"


__all__ = ["FORMATS", "Format", "bits_value", "cast_bits", "exact_value", "format_of", "hex_bits", "round_bits",
           "to_bits"]
