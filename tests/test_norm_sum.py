"""The float32 norm's sum against an exact sum on adversarial inputs (docs/numerics.md §3a).

The global norm is observed exactly: with learning_rate 1, no momentum or decay, variables at
0 and global_clipnorm 1, a gradient element of exactly 1.0 comes back as -scale, where the
program computes scale = 1 / sqrt(2 * T(sum / 2)) (T = float32, the sum of the float32
squares accumulated in float64). Its bound against the exact 1 / sqrt(S), S the exact sum of
the float32 squares (math.fsum), in relative terms: the float64 sum (n - 1) * 2^-53, its
rounding to float32 2^-24 (halved by the square root), the square root's rounding 2^-24 and
the reciprocal's 2^-24, so 2.5 * 2^-24 + (n - 1) * 2^-54 at most, which is at most that many
ulp of the scale (an ulp of x is more than x * 2^-24).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import sgdgen

N = (1 << 20) + 3  # 2^20+ elements, not a multiple of any block size


def _adversarial(kind: str) -> np.ndarray:
    rng = np.random.default_rng(15)
    if kind == "wide_range":  # squares from 2^-80 to 2^80
        g = rng.standard_normal(N) * np.exp2(rng.integers(-40, 40, N))
    elif kind == "head_and_tail":  # per 1024 elements 64 large ones, then squares under half an ulp of them
        g = np.full(N, math.sqrt(0.999 * 2.0 ** -24))
        g[np.arange(N) % 1024 < 64] = 1.0
    else:  # every square just above a rounding tie of a float32 running sum
        g = np.sqrt(1.0 + 3 * 2.0 ** -24 + rng.random(N) * 2.0 ** -22)
    g = g.astype(np.float32)
    g[0] = 1.0  # comes back as -scale, exactly
    return g


def derived_bound_ulp(n: int) -> float:
    """The module docstring's bound on |scale - 1/sqrt(S)|, in ulp of the scale."""
    return 2.5 + (n - 1) * 2.0 ** -54 * 2.0 ** 24


@pytest.mark.parametrize("kind", ["wide_range", "head_and_tail", "near_ties"])
def test_global_norm_within_the_derived_bound_of_the_exact_sum(kind: str) -> None:
    g = _adversarial(kind)
    squares = (g * g).astype(np.float64)  # the program's float32 products, widened exactly
    exact_scale = 1.0 / math.sqrt(math.fsum(squares.tolist()))
    assert exact_scale < 1.0  # the clip is active, so the scale is 1/norm
    v = sgdgen.Variable(jnp.zeros(N, jnp.float32), name="w")
    opt = sgdgen.SGD(learning_rate=1.0, momentum=0.0, global_clipnorm=1.0)
    opt.apply_gradients([(jnp.asarray(g), v)])
    scale = -float(np.asarray(v.value)[0])
    ulp = float(np.spacing(np.float32(scale)))
    assert abs(scale - exact_scale) / ulp <= derived_bound_ulp(N)


def test_derived_bound_is_the_sum_of_its_roundings() -> None:
    # 2.5 ulp from the three float32 roundings (the sum's, halved by sqrt; sqrt's; 1/x's),
    # and the float64 accumulation of 2^20 terms adds well under 1/1000 of an ulp
    assert 2.5 < derived_bound_ulp(N) < 2.5 + 1e-3
