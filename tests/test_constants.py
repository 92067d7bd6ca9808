"""sgdgen.codegen.constants rounds like the reference's NumPy / ml_dtypes casts, bit for bit.

The generator's rounding is integer arithmetic on exact fractions; the reference's is
NumPy's and ml_dtypes'. They must agree on every input: random doubles over the whole
range of each format, exact ties between neighbours, subnormals, the largest finite
values and the overflow threshold, zeros, infinities and NaNs.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from sgdgen import reference
from sgdgen.codegen import constants
from sgdgen.codegen.generate import hex_literal
from sgdgen.frontend.spec import numpy_dtype

DTYPES = ["float16", "bfloat16", "float32", "float64"]
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
RNG = np.random.default_rng(20261201)


def _bits(x: np.generic) -> int:
    a = np.asarray(x)
    return int(a.reshape(1).view(UINT[a.dtype.itemsize])[0])


def _from_bits(bits: int, dtype: str) -> float:
    """The double holding a bit pattern of `dtype` (exact: each format is a subset of float64)."""
    dt = numpy_dtype(dtype)
    return float(np.array([bits], dtype=UINT[dt.itemsize]).view(dt)[0])


def _agree(ours: int, ref: int, dtype: str) -> bool:
    """Equal bits; for NaN inputs with a payload (random float64 patterns) NaN of the same sign,
    since payloads are not kept (the canonical NaNs of `_edges` must match exactly)."""
    fmt = constants.format_of(dtype)

    def nan(b: int) -> bool:
        return (b & fmt.exponent_mask) == fmt.exponent_mask and bool(b & ((1 << fmt.fraction_bits) - 1))

    if nan(ours) and nan(ref) and ours != ref:
        return (ours ^ ref) & fmt.sign_bit == 0 and ref & ((1 << (fmt.fraction_bits - 1)) - 1) != 0
    return ours == ref


def _edges(dtype: str) -> list[float]:
    """Zeros, the subnormal range and its ties, the normal boundary, max, the overflow tie, inf, nan."""
    fmt = constants.format_of(dtype)
    tiny = Fraction(2) ** (fmt.emin - fmt.fraction_bits)  # smallest subnormal
    top = (2 - Fraction(2) ** -fmt.fraction_bits) * Fraction(2) ** fmt.emax  # largest finite
    ulp_top = Fraction(2) ** (fmt.emax - fmt.fraction_bits)
    exact = [tiny, tiny / 2, tiny * 3 / 4, tiny / 4, tiny * 3 / 2, tiny * 5 / 2,
             Fraction(2) ** fmt.emin, Fraction(2) ** fmt.emin - tiny, Fraction(2) ** fmt.emin - tiny / 2,
             top, top + ulp_top / 2, top + ulp_top / 4, top + ulp_top, 1 + Fraction(2) ** -(fmt.fraction_bits + 1),
             1 + 3 * Fraction(2) ** -(fmt.fraction_bits + 1), Fraction(1, 10), Fraction(2, 3)]
    values = []
    for q in exact:
        try:
            d = float(q)  # doubles only (the reference takes Python floats): float64's ties round here
        except OverflowError:
            continue  # past float64's overflow threshold: no double holds it
        values += [d, -d]
    return values + [0.0, -0.0, 1.0, 0.5, 2.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
                     float(np.finfo(np.float64).max), float(np.finfo(np.float64).tiny), 5e-324]


def _random_doubles(n: int) -> list[float]:
    """Random bit patterns of float64 (every exponent, subnormals and specials included)."""
    return [float(x) for x in RNG.integers(0, 2**64, size=n, dtype=np.uint64).view(np.float64)]


def _in_range(dtype: str, n: int) -> list[float]:
    """Log-uniform doubles over the dtype's own range, from below its subnormals to past its max."""
    fmt = constants.format_of(dtype)
    lo, hi = fmt.emin - fmt.fraction_bits - 2, min(fmt.emax + 2, 1023.9)  # float64: stay finite
    mag = np.exp2(RNG.uniform(lo, hi, size=n)) * RNG.choice([-1.0, 1.0], size=n)
    return [float(x) for x in mag]


def _ties(dtype: str, n: int) -> list[float]:
    """Exact midpoints between random neighbouring values of the dtype (below float64 only)."""
    if dtype == "float64":
        return []
    fmt = constants.format_of(dtype)
    top = (1 << (fmt.width - 1)) - (1 << fmt.fraction_bits) - 1  # bits of the largest finite
    out = []
    for b in RNG.integers(0, top, size=n):
        lo, hi = _from_bits(int(b), dtype), _from_bits(int(b) + 1, dtype)
        mid = (Fraction(lo) + Fraction(hi)) / 2
        assert Fraction(float(mid)) == mid  # p + 1 bits fit in a double
        out += [float(mid), -float(mid)]
    return out


def _cases(dtype: str) -> list[float]:
    return _edges(dtype) + _random_doubles(3000) + _in_range(dtype, 3000) + _ties(dtype, 2000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_bits_matches_reference_to_T(dtype: str) -> None:
    dt = numpy_dtype(dtype)
    pairs = [(x, constants.to_bits(x, dtype), _bits(reference.to_T(x, dt))) for x in _cases(dtype)]
    bad = [p for p in pairs if not _agree(p[1], p[2], dtype)]
    assert not bad, f"{len(bad)} mismatches, e.g. (x, ours, reference) = {bad[:5]}"


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # the reference's NaN cast
@pytest.mark.parametrize("dtype", DTYPES)
def test_cast_bits_matches_reference_cast_T(dtype: str) -> None:
    dt = numpy_dtype(dtype)
    cases = _cases(dtype) + _cases("float32")  # float32's ties and range matter for the first rounding
    pairs = [(x, constants.cast_bits(x, dtype), _bits(reference.cast_T(x, dt))) for x in cases]
    bad = [p for p in pairs if not _agree(p[1], p[2], dtype)]
    assert not bad, f"{len(bad)} mismatches, e.g. (x, ours, reference) = {bad[:5]}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_value_of_the_format_rounds_to_itself(dtype: str) -> None:
    """bits -> exact value -> bits is the identity on random finite patterns (both signs)."""
    fmt = constants.format_of(dtype)
    top = (1 << (fmt.width - 1)) - (1 << fmt.fraction_bits)  # first pattern of inf
    patterns = [int(b) for b in RNG.integers(0, top, size=4000)] + [0, 1, top - 1, (1 << fmt.fraction_bits)]
    for b in patterns:
        for bits in (b, b | fmt.sign_bit):
            value = constants.bits_value(bits, fmt)
            if value == 0:
                continue  # a Fraction zero has no sign; signed zeros are in the edge cases
            assert constants.round_bits(value, fmt) == bits


def test_python_ints_round_exactly_without_a_detour_through_float64() -> None:
    """An int is rounded from its exact value: 2^53 + 1 is a float64 tie (to even, 2^53), and an
    int just above a float32 tie rounds up, where the double nearest to it sits on the tie."""
    f64, f32 = constants.FORMATS["float64"], constants.FORMATS["float32"]
    assert constants.to_bits(2**53 + 1, "float64") == constants.round_bits(Fraction(2**53), f64)
    assert constants.to_bits(2**53 + 3, "float64") == constants.round_bits(Fraction(2**53 + 4), f64)
    # 2^64 + 2^40 + 1: a double rounds it to 2^64 + 2^40, a float32 tie that goes to even (2^64);
    # the exact value is above the tie, so float32 rounds it up to 2^64 + 2^41.
    x = 2**64 + 2**40 + 1
    assert constants.to_bits(x, "float32") == constants.round_bits(Fraction(2**64 + 2**41), f32)
    assert constants.to_bits(float(x), "float32") == constants.round_bits(Fraction(2**64), f32)


def test_numpy_scalars_and_zero_d_arrays_are_their_exact_values() -> None:
    for dtype in DTYPES:
        for x in (np.float16(0.1), np.float32(0.1), np.float64(0.1), np.array(0.1), np.int64(3)):
            assert constants.to_bits(x, dtype) == _bits(reference.to_T(float(x), numpy_dtype(dtype)))
    with pytest.raises(TypeError, match="bool"):
        constants.to_bits(True, "float32")
    with pytest.raises(ValueError, match="'int32' has no floating format"):
        constants.to_bits(1.0, "int32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_hex_literal_is_the_padded_bit_pattern(dtype: str) -> None:
    dt = numpy_dtype(dtype)
    for x in _edges(dtype)[:20] + _in_range(dtype, 50):
        width = dt.itemsize * 2
        assert hex_literal(x, dtype) == f"0x{_bits(reference.to_T(x, dt)):0{width}X}"
        assert hex_literal(x, dtype, via_float32=True) == f"0x{_bits(reference.cast_T(x, dt)):0{width}X}"


def test_the_generator_and_pipeline_do_not_import_the_reference() -> None:
    code = ("import sys, sgdgen.codegen.generate, sgdgen.codegen.pipeline, sgdgen.passes; "
            "sys.exit('sgdgen.reference' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
