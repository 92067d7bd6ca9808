"""NumPy reference of one SGD ``apply_gradients`` call: the readable spec and the test oracle.

This module is a transcription of SEMANTICS.md §4 (tf_keras 2.21 ``SGD``, non-mesh path), one
function per rule, each with its formula in the docstring. It is *unfused*: it does the eager
tf_keras arithmetic, where every op rounds in the variable dtype ``T`` and nothing is contracted
into an FMA (decision 12). Supported dtypes: float16, bfloat16 (``ml_dtypes.bfloat16``), float32,
float64. Only NumPy and ml_dtypes are used.

Notation: ``T`` is the variable dtype, ``T(x)`` the value ``x`` rounded to ``T`` (round to
nearest, ties to even), ``it`` the value of ``iterations`` before the call.

Constants (SEMANTICS §6):

* ``lr``, ``momentum`` and ``weight_decay`` reach ``T`` through ``tf.cast``, which converts a
  Python float through a float32 tensor: ``T(float32(x))`` (:func:`cast_T`). So a float64 variable
  uses ``lr = 0.10000000149011612`` for ``learning_rate=0.1``.
* ``ema_momentum``, ``1 - ema_momentum`` (computed in Python double), the clip constants and the
  ``0.5``/``2.0`` of the global norm are Python scalars in tensor arithmetic: one rounding from the
  double straight to ``T`` (:func:`to_T`).

bfloat16 from double: ``np.array(x, dtype=ml_dtypes.bfloat16)`` (ml_dtypes 0.6) goes through
float32 and so rounds *twice*; e.g. ``1 + 2**-8 + 2**-40`` gives 1.0 where one rounding gives
1.0078125. :func:`to_T` therefore rounds a double to float32 with round-to-odd first, which makes
the following float32 -> bfloat16 rounding (a single ml_dtypes rounding) equal to one
round-to-nearest-even from the double. float16: NumPy's float64 -> float16 cast already rounds once.
The two only differ for doubles within 2**-24 (relative) of a bfloat16 tie.

Arithmetic on float16/bfloat16 arrays is NumPy/ml_dtypes arithmetic: each ufunc computes in
float32 and rounds to ``T``, which is also what Eigen does on CPU.

Norm sums (the one exception to "every op in T", SEMANTICS §6): products ``g*g`` are rounded in
``T``, then summed in a wide accumulator (float32 for float16/bfloat16, float64 for float32/float64)
and the sum is rounded once to ``T``. The order of summation is NumPy's; compare norms at 2 ulp.

The config object is read through these attributes only: ``learning_rate`` (float, or a schedule
``schedule(step: int) -> np.float32``), ``momentum``, ``nesterov``, ``weight_decay`` (None or
float), ``clip_mode`` (None, "clipnorm", "global_clipnorm" or "clipvalue", already resolved by
priority, decision 7), ``clip_value``, ``use_ema``, ``ema_momentum`` and ``ema_overwrite_every``
(int or None; 0/None never overwrite).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "SUPPORTED_DTYPES",
    "RefState",
    "INT64_MAX",
    "all_finite",
    "apply_gradients",
    "increment",
    "build",
    "cast_T",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_gradients",
    "ema_overwrite",
    "ema_update",
    "finalize_variable_values",
    "learning_rate",
    "run",
    "sgd_update",
    "to_T",
    "weight_decay",
    "wide_sum",
]

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

#: The variable dtypes the reference (and sgdgen) accepts.
SUPPORTED_DTYPES: tuple[np.dtype, ...] = (
    np.dtype(np.float16),
    BFLOAT16,
    np.dtype(np.float32),
    np.dtype(np.float64),
)

_CLIP_MODES = (None, "clipnorm", "global_clipnorm", "clipvalue")


# --------------------------------------------------------------------------------------------
# dtype helpers
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: Any) -> str:
    dt = np.dtype(dtype)
    return "bfloat16" if dt == BFLOAT16 else dt.name


def _check_dtype(dtype: Any, what: str = "variable") -> np.dtype:
    """Returns ``np.dtype(dtype)`` if it is a supported float type, else raises TypeError (decision 16)."""
    dt = np.dtype(dtype)
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {_dtype_name(dt)}; SGD updates floating variables only "
            "(float16, bfloat16, float32, float64). Integer and complex variables are refused."
        )
    return dt


def _double_to_float32_round_to_odd(x: float) -> np.float32:
    """``float32`` nearest to ``x`` with round-to-odd: exact values stay, others take the odd neighbour.

    Rounding to odd with at least two more bits than the final format, then rounding to nearest
    even, gives the same result as one round-to-nearest-even from ``x``.
    """
    with np.errstate(over="ignore"):
        f = np.float32(x)
    if not np.isfinite(f) or float(f) == x:
        return f
    bits = f.view(np.uint32)
    if int(bits) & 1:  # already the odd neighbour
        return f
    toward = np.float32(np.inf) if x > float(f) else np.float32(-np.inf)
    return np.nextafter(f, toward)


def to_T(x: Any, dtype: Any) -> np.generic:
    """``T(x)``: one round-to-nearest-even conversion of the Python double ``x`` to ``T``.

    Used for Python scalars in tensor arithmetic: ``ema_momentum``, ``1 - ema_momentum``, the clip
    constants, ``0.5`` and ``2.0``. For bfloat16 the double is rounded to float32 with round-to-odd
    first, so that ml_dtypes' float32 -> bfloat16 rounding is the only rounding (ml_dtypes' own
    float64 -> bfloat16 cast goes through float32 and would round twice).
    Returns a NumPy scalar of dtype ``T``.
    """
    dt = np.dtype(dtype)
    with np.errstate(over="ignore"):  # out of range -> inf, as the cast does
        if dt == BFLOAT16:
            return np.array(_double_to_float32_round_to_odd(float(x)), dtype=BFLOAT16)[()]
        return np.array(float(x), dtype=dt)[()]


def cast_T(x: Any, dtype: Any) -> np.generic:
    """``T(float32(x))``: the ``tf.cast`` rule for ``lr``, ``momentum`` and ``weight_decay``.

    tf.cast of a Python float converts it through a float32 tensor first, so even a float64
    variable sees the float32-rounded value (decision 16: ints, NumPy scalars and 0-d arrays too).
    float32 -> T is a single rounding. Idempotent: a value already in T is returned unchanged
    (any value of T, float64 aside, is a float32 value; a float64 lr here is already float32-rounded).
    """
    with np.errstate(over="ignore"):
        f = np.float32(np.asarray(x))
        return np.array(f, dtype=np.dtype(dtype))[()]


def _wide_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype in (np.dtype(np.float16), BFLOAT16) else np.dtype(np.float64)


def wide_sum(x: np.ndarray) -> np.generic:
    """``T(sum(x))``: the sum of all elements of ``x`` (dtype ``T``), accumulated wide, rounded once to ``T``.

    The accumulator is float32 for float16/bfloat16 and float64 for float32/float64 (SEMANTICS §6).
    """
    x = np.asarray(x)
    wide = _wide_dtype(x.dtype)
    with np.errstate(all="ignore"):
        s = np.sum(x.astype(wide), dtype=wide)
    return np.array(s, dtype=x.dtype)[()]


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass
class RefState:
    """Optimizer state after some number of calls.

    ``iterations`` is the number of completed ``apply_gradients`` calls; ``variables`` the model
    variables; ``momenta`` the ``m`` slot of each variable (always present, SEMANTICS §3);
    ``averages`` the EMA slot of each variable, or None without EMA; ``skipped`` the number of
    calls skipped for a non-finite gradient (``skip_nonfinite``; stays 0 otherwise).
    """

    iterations: int
    variables: list[np.ndarray]
    momenta: list[np.ndarray]
    averages: list[np.ndarray] | None
    skipped: int = 0

    def copy(self) -> RefState:
        """A deep copy: no array is shared with ``self``."""
        return RefState(
            iterations=int(self.iterations),
            variables=[np.array(v, copy=True) for v in self.variables],
            momenta=[np.array(m, copy=True) for m in self.momenta],
            averages=None if self.averages is None else [np.array(a, copy=True) for a in self.averages],
            skipped=int(self.skipped),
        )


def build(config: Any, variables: Sequence[np.ndarray]) -> RefState:
    """State before the first call (SEMANTICS §3).

    * ``iterations = 0``
    * ``m_i = zeros_like(var_i)`` for every variable, even with momentum 0
    * ``avg_i = copy(var_i)`` when ``use_ema`` (the average starts at the build-time weights)

    Raises TypeError for a variable that is not float16/bfloat16/float32/float64 (decision 16).
    """
    vs: list[np.ndarray] = []
    for i, v in enumerate(variables):
        arr = np.array(v, copy=True)
        _check_dtype(arr.dtype, what=f"variable {i}")
        vs.append(arr)
    momenta = [np.zeros_like(v) for v in vs]
    averages = [np.array(v, copy=True) for v in vs] if config.use_ema else None
    return RefState(iterations=0, variables=vs, momenta=momenta, averages=averages)


# --------------------------------------------------------------------------------------------
# Learning rate (§4 step 0, §5)
# --------------------------------------------------------------------------------------------


def _is_schedule(lr: Any) -> bool:
    return callable(lr)


def learning_rate(config: Any, iterations: int) -> np.float32:
    """The float32 learning rate of the call made when ``iterations == it``.

    * float lr: ``float32(lr)``
    * schedule: ``float32(schedule(it))``, evaluated at ``iterations`` *before* the increment, so
      call k (1-based) uses ``schedule(k - 1)``.
    """
    lr = config.learning_rate
    if _is_schedule(lr):
        return np.float32(np.asarray(lr(int(iterations))))
    return np.float32(np.asarray(lr))


# --------------------------------------------------------------------------------------------
# Clipping (§4 step 5, CLIP formulas)
# --------------------------------------------------------------------------------------------


def clip_by_norm(g: np.ndarray, c: float) -> np.ndarray:
    """``tf.clip_by_norm(g, c)`` over all axes, in ``T = g.dtype``, with ``c = T(c)`` (one rounding).

    ``l2sum = T(sum(T(g*g)))`` (wide accumulation);
    ``l2norm = sqrt(l2sum) if l2sum > 0 else l2sum``;
    ``out = T(T(g*c) / max(l2norm, c))``: multiply first, then divide, so below the threshold the
    result is ``(g*c)/c``, not always bit-identical to ``g``. ``max`` propagates NaN: a NaN in ``g``
    makes the whole tensor NaN; an inf gives NaN at the inf and 0 elsewhere (§9, decision 14).
    A negative ``c`` is replaced by 0 (CLIP:219).
    """
    g = np.asarray(g)
    T = g.dtype
    with np.errstate(all="ignore"):
        cT = to_T(max(float(c), 0.0), T)
        l2sum = wide_sum(g * g)
        l2norm = np.sqrt(l2sum) if l2sum > 0 else l2sum
        out = (g * cT) / np.maximum(l2norm, cT)
    return np.asarray(out, dtype=T)


def clip_by_global_norm(grads: Sequence[np.ndarray], c: float) -> list[np.ndarray]:
    """``tf.clip_by_global_norm(grads, c)[0]``, in the common dtype ``T``, with ``c = T(c)``.

    ``half_i = T(sum(T(T(g_i*g_i) * T(0.5))))`` per tensor (L2Loss, wide accumulation);
    ``norm = sqrt(T(T(sum(half_i)) * T(2)))``;
    ``scale = T(c * min(T(1/norm), T(T(1)/c)))``: two roundings, not ``c/norm``; ``1/0 = inf``;
    ``scale = scale + (norm - norm)``: NaN for an inf or NaN norm, so one inf gradient makes every
    gradient NaN; ``out_i = T(g_i * scale)``.

    Every gradient must have the same dtype (tf.stack); ValueError otherwise.
    """
    gs = [np.asarray(g) for g in grads]
    if not gs:
        return []
    dtypes = sorted({_dtype_name(g.dtype) for g in gs})
    if len(dtypes) > 1:
        raise ValueError(
            "clip_by_global_norm needs all gradients to share one dtype (the norms are stacked); "
            f"got {', '.join(dtypes)}"
        )
    T = gs[0].dtype
    with np.errstate(all="ignore"):
        half = to_T(0.5, T)
        two = to_T(2.0, T)
        one = to_T(1.0, T)
        cT = to_T(c, T)
        halves = np.array([wide_sum((g * g) * half) for g in gs], dtype=T)
        norm = np.sqrt(wide_sum(halves) * two)
        scale = cT * np.minimum(one / norm, one / cT)
        scale = scale + (norm - norm)
        out = [np.asarray(g * scale, dtype=T) for g in gs]
    return out


def clip_by_value(g: np.ndarray, c: float) -> np.ndarray:
    """``tf.clip_by_value(g, -c, c)`` = ``max(min(g, T(c)), T(-c))``; NaN stays NaN (np.minimum/np.maximum)."""
    g = np.asarray(g)
    T = g.dtype
    with np.errstate(all="ignore"):
        out = np.maximum(np.minimum(g, to_T(c, T)), to_T(-float(c), T))
    return np.asarray(out, dtype=T)


def clip_gradients(config: Any, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
    """§4 step 5 on the present gradients, by ``config.clip_mode`` (resolved by priority
    clipnorm > global_clipnorm > clipvalue, decision 7). A clip value of 0 or below (or None)
    disables clipping, as ``if clipnorm and clipnorm > 0`` does.
    """
    mode = config.clip_mode
    if mode not in _CLIP_MODES:
        raise ValueError(f"unknown clip_mode {mode!r}; expected one of {_CLIP_MODES}")
    c = config.clip_value
    if mode is None or c is None or not c > 0:
        return [np.asarray(g) for g in grads]
    if mode == "clipnorm":
        return [clip_by_norm(g, c) for g in grads]
    if mode == "global_clipnorm":
        return clip_by_global_norm(grads, c)
    return [clip_by_value(g, c) for g in grads]


# --------------------------------------------------------------------------------------------
# Weight decay, update step, EMA (§4 steps 7-10)
# --------------------------------------------------------------------------------------------


def weight_decay(var: np.ndarray, wd: Any, lr: Any) -> np.ndarray:
    """Decoupled weight decay, before the gradient step: ``var - T(T(var*wd)*lr)``.

    ``wd = T(float32(wd))`` and ``lr = T(float32(lr))`` (tf.cast). ``wd = 0.0`` still runs, so an
    inf weight becomes NaN (``inf*0``).
    """
    var = np.asarray(var)
    T = var.dtype
    with np.errstate(all="ignore"):
        out = var - ((var * cast_T(wd, T)) * cast_T(lr, T))
    return np.asarray(out, dtype=T)


def sgd_update(
    var: np.ndarray, m: np.ndarray, g: np.ndarray, lr: Any, momentum: Any, nesterov: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Dense SGD ``update_step`` (SGD:155-188), unfused; returns ``(var_new, m_new)``.

    ``lr = T(float32(lr))``, ``mom = T(float32(momentum))``;
    ``m_new = T(T(T(-g)*lr) + T(m*mom))``, written even when momentum is 0 (then ``m_new = -g*lr``);
    nesterov: ``var_new = T(var + T(T(T(-g)*lr) + T(m_new*mom)))``;
    otherwise: ``var_new = T(var + m_new)``.
    """
    var = np.asarray(var)
    T = var.dtype
    g = np.asarray(g)
    m = np.asarray(m)
    lrT = cast_T(lr, T)
    momT = cast_T(momentum, T)
    with np.errstate(all="ignore"):
        m_new = np.asarray((-g) * lrT + m * momT, dtype=T)
        if nesterov:
            var_new = var + ((-g) * lrT + m_new * momT)
        else:
            var_new = var + m_new
    return np.asarray(var_new, dtype=T), m_new


def ema_update(avg: np.ndarray, var: np.ndarray, ema_momentum: float) -> np.ndarray:
    """``avg_new = T(T(e*avg) + T(d*var))`` with ``e = T(ema_momentum)`` and ``d = T(1 - ema_momentum)``,
    where ``1 - ema_momentum`` is computed in Python double before the one rounding to ``T``
    (float16: e = 0.990234375, d = 0.010002136; they do not sum to 1). No bias correction.
    """
    avg = np.asarray(avg)
    T = avg.dtype
    em = float(ema_momentum)
    e = to_T(em, T)
    d = to_T(1.0 - em, T)
    with np.errstate(all="ignore"):
        out = e * avg + d * np.asarray(var)
    return np.asarray(out, dtype=T)


def ema_overwrite(iterations: int, frequency: int | None) -> bool:
    """Whether the call made at ``iterations == it`` copies the averages into the variables:
    ``frequency`` truthy and ``(it + 1) % frequency == 0`` (freq 3 fires on calls 3, 6, 9, ...).
    """
    return bool(frequency) and (int(iterations) + 1) % int(frequency) == 0


# --------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------


#: The int64 counters (``iterations``, ``skipped``) stop here instead of wrapping (§2 step 8).
INT64_MAX = 2**63 - 1


def increment(counter: int) -> int:
    """``counter + 1``, saturating at INT64_MAX (the program's int64 counter never wraps negative)."""
    return int(counter) + (int(counter) != INT64_MAX)


def all_finite(grads: Sequence[np.ndarray]) -> bool:
    """Whether every element of every gradient is finite (no NaN, no +-Inf)."""
    return all(bool(np.all(np.isfinite(np.asarray(g, dtype=np.float64)))) for g in grads)


def apply_gradients(
    config: Any,
    state: RefState,
    grads: Sequence[np.ndarray | None],
    *,
    decay_mask: Sequence[bool] | None = None,
    lr_override: float | None = None,
) -> RefState:
    """One ``apply_gradients`` call (SEMANTICS §4); returns a new state, the inputs are not mutated.

    ``grads[i]`` is the gradient of ``state.variables[i]`` or None. In order:

    0. ``lr = learning_rate(config, it)`` (or ``float32(lr_override)``, which sets a float lr at
       run time; TypeError with a schedule).
    1. all gradients None -> ValueError("No gradients provided for any variable ..."), nothing
       changes (decisions 8, 15). An empty list (no variables) returns the state unchanged,
       without an increment (§4 step 2).
    4. a None gradient drops its variable from everything below (decay, update, EMA, overwrite).
    5. clipping of the present gradients (:func:`clip_gradients`).
    7. if ``weight_decay`` is not None: ``var = var - var*wd*lr`` for each present variable whose
       ``decay_mask`` entry is True (default all True).
    8. ``var, m = sgd_update(var, m, g, lr, momentum, nesterov)``, in list order.
    9. if ``use_ema``: ``avg = ema_update(avg, var, ema_momentum)`` for each present variable.
    10. if ``use_ema`` and ``(it + 1) % ema_overwrite_every == 0``: ``var = copy(avg)`` for each
        present variable (a copy, not a swap).
    11. ``iterations += 1``, saturating at INT64_MAX (:func:`increment`).

    With ``skip_nonfinite``, after the checks of 1-4: when a present gradient holds a NaN or an
    Inf, nothing of 5-11 happens; only ``skipped`` is incremented (optax ``apply_if_finite``).

    Each gradient must have its variable's dtype and shape (no cast, §6).
    """
    n = len(state.variables)
    grads = list(grads)
    if len(grads) != n:
        raise ValueError(f"got {len(grads)} gradients for {n} variables")
    if decay_mask is None:
        mask = [True] * n
    else:
        mask = [bool(x) for x in decay_mask]
        if len(mask) != n:
            raise ValueError(f"decay_mask has {len(mask)} entries for {n} variables")

    if lr_override is not None and _is_schedule(config.learning_rate):
        raise TypeError(
            "This optimizer was created with a `LearningRateSchedule` object as its `learning_rate` "
            "constructor argument, hence its learning rate is not settable."
        )

    new = state.copy()
    if n == 0:  # apply_gradients([]): nothing to do, no increment (§4 step 2)
        return new

    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        raise ValueError(
            "No gradients provided for any variable: "
            f"({[f'variable_{i}' for i in range(n)]},). Provided `grads_and_vars` is all None."
        )

    it = int(state.iterations)
    lr = np.float32(np.asarray(lr_override)) if lr_override is not None else learning_rate(config, it)

    gs: list[np.ndarray] = []
    for i in present:
        g = np.asarray(grads[i])
        v = new.variables[i]
        if g.dtype != v.dtype:
            raise TypeError(
                f"gradient {i} has dtype {_dtype_name(g.dtype)} but its variable has dtype "
                f"{_dtype_name(v.dtype)}; gradients are not cast"
            )
        if g.shape != v.shape:
            raise ValueError(f"gradient {i} has shape {g.shape} but its variable has shape {v.shape}")
        gs.append(g)

    if getattr(config, "skip_nonfinite", False) and not all_finite(gs):
        new.skipped = increment(new.skipped)
        return new

    gs = clip_gradients(config, gs)

    if config.weight_decay is not None:
        for i in present:
            if mask[i]:
                new.variables[i] = weight_decay(new.variables[i], config.weight_decay, lr)

    for i, g in zip(present, gs, strict=True):
        new.variables[i], new.momenta[i] = sgd_update(
            new.variables[i], new.momenta[i], g, lr, config.momentum, bool(config.nesterov)
        )

    if config.use_ema:
        assert new.averages is not None
        for i in present:
            new.averages[i] = ema_update(new.averages[i], new.variables[i], config.ema_momentum)
        if ema_overwrite(it, config.ema_overwrite_every):
            for i in present:
                new.variables[i] = np.array(new.averages[i], copy=True)

    new.iterations = increment(it)
    return new


def finalize_variable_values(config: Any, state: RefState) -> list[np.ndarray]:
    """The weights ``finalize_variable_values`` leaves: copies of the averages with EMA, else of the variables."""
    src = state.averages if config.use_ema else state.variables
    assert src is not None
    return [np.array(x, copy=True) for x in src]


def run(
    config: Any,
    variables: Sequence[np.ndarray],
    grads_per_step: Sequence[Sequence[np.ndarray | None]],
    *,
    decay_mask: Sequence[bool] | None = None,
) -> RefState:
    """``build(config, variables)``, then one :func:`apply_gradients` per entry of ``grads_per_step``."""
    state = build(config, variables)
    for grads in grads_per_step:
        state = apply_gradients(config, state, grads, decay_mask=decay_mask)
    return state
