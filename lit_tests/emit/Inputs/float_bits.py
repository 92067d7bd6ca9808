"""Filter for lit tests: rewrite decimal splat float constants as their exact bit pattern.

The MLIR printer turns the generator's hex literals (`dense<0x3F7D70A4>`) back into the
shortest decimal that round-trips (`dense<9.900000e-01>`). This filter undoes that, so a
test can check the bits a constant has in its element type:

    dense<9.900000e-01> : tensor<8x16xf32>   ->   dense<0x3F7D70A4> : tensor<8x16xf32>

It parses the decimal exactly (`fractions.Fraction`) and rounds it once, to nearest with
ties to even, into the element type -- the rounding MLIR's parser does -- so the result does
not depend on the generator's own `hex_literal`. Everything else passes through unchanged.

    sgdgen emit ... | python float_bits.py | filecheck %s
"""

import re
import sys
from fractions import Fraction

import ml_dtypes
import numpy as np

DTYPES = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32, "f64": np.float64}
UINTS = {2: np.uint16, 4: np.uint32, 8: np.uint64}

CONSTANT = re.compile(
    r"dense<(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)>"
    r"(?P<type> : tensor<(?:\d+x)*(?P<et>f16|bf16|f32|f64)>)"
)


def nearest(text: str, dtype: type) -> int:
    """Bits of the `dtype` value nearest to the decimal `text` (ties to an even significand)."""
    exact = Fraction(text)
    uint = UINTS[np.dtype(dtype).itemsize]
    sign = 1 << (8 * np.dtype(dtype).itemsize - 1)
    guess = int(np.array(float(text)).astype(dtype).view(uint)[()])  # within an ulp of the answer
    magnitude = guess & ~sign
    candidates = [(guess & sign) | m for m in (magnitude - 1, magnitude, magnitude + 1) if m >= 0]

    def value(b: int) -> float:
        return float(np.array(b, dtype=uint).view(dtype)[()])

    finite = [b for b in candidates if np.isfinite(value(b))]
    return min(finite, key=lambda b: (abs(Fraction(value(b)) - exact), b & 1))


def bits(text: str, et: str) -> str:
    width = np.dtype(DTYPES[et]).itemsize
    return f"0x{nearest(text, DTYPES[et]):0{2 * width}X}"


def main() -> None:
    text = sys.stdin.read()
    sys.stdout.write(CONSTANT.sub(lambda m: f"dense<{bits(m['value'], m['et'])}>{m['type']}", text))


if __name__ == "__main__":
    main()
