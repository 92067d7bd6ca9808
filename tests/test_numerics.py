"""The compiled stage-0 step against the NumPy reference (docs/numerics.md §4).

Each case compiles one step (one device, `Mesh(())`, unless stated) and runs 10 steps both
compiled and in `sgdgen.reference`, from random variables and random gradients sized so
that an active clip triggers on some steps and not on others (tests/support/stepdriver.py).
Every step is compared from the program's own state (float32 within 1e-6 of the scale,
XLA contracts into FMAs; float16 and bfloat16 within 2 ulp of the scale), and the whole
trajectory against an independent reference run (float32 within 1e-6; 16-bit within the
derived `TrajectoryBound`). The seed's two usage examples and the exactness of the
in-program learning-rate schedules are checked separately.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from support.stepdriver import EmulatedStep, assert_matches, compile_step, run_against_reference

from sgdgen import reference

from sgdgen import backend
from sgdgen.frontend import schedules
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Mesh, VarSpec

ONE_DEVICE = Mesh(())


def model(dtype: str = "float32", mesh: Mesh = ONE_DEVICE, *, exclude_bias: bool = False) -> list[VarSpec]:
    """Scalar, vector, 2-D and 3-D variables in one model."""
    return [
        VarSpec.create("scale", [], dtype, mesh),
        VarSpec.create("dense/bias", [7], dtype, mesh, decay=not exclude_bias),
        VarSpec.create("dense/kernel", [32, 24], dtype, mesh),
        VarSpec.create("conv/kernel", [3, 4, 5], dtype, mesh),
    ]


FULL = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, global_clipnorm=1.0,
            use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)

#: id -> (SGDConfig.create kwargs, dtype, exclude a variable from weight decay)
CASES = {
    # every option alone, float32
    "plain": (dict(learning_rate=0.1), "float32", False),
    "momentum": (dict(learning_rate=0.1, momentum=0.9), "float32", False),
    "nesterov": (dict(learning_rate=0.1, momentum=0.9, nesterov=True), "float32", False),
    "weight_decay": (dict(learning_rate=0.1, weight_decay=0.05), "float32", False),
    "weight_decay-excluded_bias": (dict(learning_rate=0.1, weight_decay=0.05), "float32", True),
    "clipnorm": (dict(learning_rate=0.1, clipnorm=1.0), "float32", False),
    "clipvalue": (dict(learning_rate=0.1, clipvalue=0.5), "float32", False),
    "global_clipnorm": (dict(learning_rate=0.1, global_clipnorm=1.0), "float32", False),
    "clipnorm+clipvalue_ignored": (dict(learning_rate=0.1, clipnorm=1.0, clipvalue=0.01), "float32", False),
    "global_clipnorm+clipvalue_ignored": (dict(learning_rate=0.1, global_clipnorm=1.0, clipvalue=0.01),
                                          "float32", False),
    "ema": (dict(learning_rate=0.1, use_ema=True, ema_momentum=0.9), "float32", False),
    "ema-overwrite3": (dict(learning_rate=0.1, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
                       "float32", False),
    "ema-overwrite1": (dict(learning_rate=0.1, use_ema=True, ema_overwrite_frequency=1), "float32", False),
    # the full combination
    "full": (FULL, "float32", True),
    # 16-bit
    "bf16-plain": (dict(learning_rate=0.1), "bfloat16", False),
    "bf16-nesterov": (dict(learning_rate=0.1, momentum=0.9, nesterov=True), "bfloat16", False),
    "bf16-clipnorm": (dict(learning_rate=0.1, clipnorm=1.0), "bfloat16", False),
    "bf16-weight_decay": (dict(learning_rate=0.1, weight_decay=0.05), "bfloat16", False),
    "bf16-full": (FULL, "bfloat16", True),
    "f16-full": (FULL, "float16", True),
}

#: Every schedule kind of sgdgen.frontend.schedules, with its interesting points inside 10 steps.
SCHEDULES = {
    "ExponentialDecay": schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5),
    "ExponentialDecay-staircase": schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5, staircase=True),
    "PiecewiseConstantDecay": schedules.PiecewiseConstantDecay([2, 5, 7], [0.1, 0.05, 0.02, 0.01]),
    "PolynomialDecay": schedules.PolynomialDecay(0.1, decay_steps=6, end_learning_rate=0.01, power=2.0),
    "PolynomialDecay-cycle": schedules.PolynomialDecay(0.1, decay_steps=4, end_learning_rate=0.01, power=0.5,
                                                       cycle=True),
    "InverseTimeDecay": schedules.InverseTimeDecay(0.1, decay_steps=3, decay_rate=0.5),
    "InverseTimeDecay-staircase": schedules.InverseTimeDecay(0.1, decay_steps=3, decay_rate=0.5, staircase=True),
    "CosineDecay": schedules.CosineDecay(0.1, decay_steps=7, alpha=0.1),
    "CosineDecay-warmup": schedules.CosineDecay(0.01, decay_steps=5, warmup_target=0.1, warmup_steps=3),
    "CosineDecayRestarts-t_mul1": schedules.CosineDecayRestarts(0.1, first_decay_steps=3, t_mul=1.0, m_mul=0.8,
                                                                alpha=0.05),
    "CosineDecayRestarts-t_mul2": schedules.CosineDecayRestarts(0.1, first_decay_steps=2, t_mul=2.0, m_mul=0.9),
}


def _check_clipping_exercised(result) -> None:
    """An active clip must have triggered on some steps and not on others."""
    if result.config.clip_mode is None:
        return
    per_step = [any(c) for c in result.clipped]
    assert any(per_step) and not all(per_step), f"clip triggered on steps {per_step}"


@pytest.mark.parametrize("kwargs, dtype, exclude", list(CASES.values()), ids=list(CASES))
def test_options(kwargs, dtype, exclude):
    config = SGDConfig.create(**kwargs)
    result = run_against_reference(config, model(dtype, exclude_bias=exclude), ONE_DEVICE, steps=10)
    _check_clipping_exercised(result)
    assert_matches(result)


@pytest.mark.parametrize("schedule", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_schedule_with_momentum(schedule):
    config = SGDConfig.create(learning_rate=schedule, momentum=0.9)
    result = run_against_reference(config, model(), ONE_DEVICE, steps=10)
    # the schedule really changes the rate within the 10 steps
    assert len(set(result.learning_rates)) > 1, result.learning_rates
    assert_matches(result)


# ---- the comparisons themselves, on known differences (no compiler: the same on every machine) ----


def fma_sgd_update(var, m, g, lr, momentum, nesterov):
    """reference.sgd_update with `(-g)*lr + m*mom` contracted to fma(-g, lr, T(m*mom)): the
    product -g*lr is not rounded. This is what XLA CPU's code does for float16 on a CPU with
    native float16 arithmetic (AVX512-FP16: Intel Xeon of the Sapphire Rapids kind, which
    also has AMX and avx512_bf16): LLVM fuses the f16 multiply-add into one vfmadd..ph.
    Where float16 is computed in float32 and rounded after every op (no AVX512-FP16), no
    contraction happens and the program matches the unfused reference bit for bit.
    The sum is exact in float64 (two 11-bit products), so one float16 rounding follows."""
    T = var.dtype
    lrT, momT = reference.cast_T(lr, T), reference.cast_T(momentum, T)
    exact = (-g).astype(np.float64) * np.float64(lrT)

    def fused(product):
        return np.asarray(exact + np.asarray(product, dtype=T).astype(np.float64), dtype=T)

    m_new = fused(m * momT)
    var_new = var + (fused(m_new * momT) if nesterov else m_new)
    return np.asarray(var_new, dtype=T), m_new


def test_float16_fma_contraction_holds_per_step_and_within_the_derived_bound():
    """Issue 8's `test_options[f16-full]` failure (momentum of 'dense/kernel', 3 ulp after step 5,
    on an AMX / AVX512-FP16 Xeon) is this contraction compounding: each step is within 1 ulp,
    the trajectory reaches 3 ulp, and the derived bound (not a tuned one) holds."""
    config = SGDConfig.create(**FULL)
    variables = model("float16", exclude_bias=True)
    program = EmulatedStep(config, variables, update=fma_sgd_update)
    result = run_against_reference(config, variables, ONE_DEVICE, steps=10, program=program)
    assert_matches(result)
    kernel = next(t for t in result.trajectory if t.label == "momentum of 'dense/kernel'")
    assert kernel.ulps > 2, "the emulation should reproduce the compounding the old 2-ulp trajectory check failed on"
    assert max(s.ulps for s in result.slots) <= 1.0, result.summary()


def test_trajectory_check_catches_what_the_per_step_check_cannot():
    """A program whose EMA average starts as zeros instead of a copy of the variable: every step
    is right from its own state, so only the trajectory against an independent run sees it."""
    config = SGDConfig.create(**FULL)
    variables = model("float16", exclude_bias=True)

    def zero_averages(st: reference.RefState) -> reference.RefState:
        st = st.copy()
        st.averages = [np.zeros_like(a) for a in st.averages]
        return st

    result = run_against_reference(config, variables, ONE_DEVICE, steps=10,
                                   program=EmulatedStep(config, variables, initial=zero_averages))
    assert max(s.ulps for s in result.slots) == 0
    with pytest.raises(AssertionError, match="average of .* over 10 steps from the same initial state"):
        assert_matches(result)


def test_per_step_check_catches_a_one_rounding_error_in_momentum():
    """A momentum rounded through a 3-ulp-off momentum constant fails per step at once."""
    config = SGDConfig.create(**FULL)
    variables = model("bfloat16", exclude_bias=True)

    unfused = reference.sgd_update  # EmulatedStep replaces the module's name while it steps

    def off_momentum(var, m, g, lr, momentum, nesterov):
        mom = float(reference.cast_T(momentum, var.dtype))
        return unfused(var, m, g, lr, mom * (1 + 3 * 2.0**-8), nesterov)

    result = run_against_reference(config, variables, ONE_DEVICE, steps=10,
                                   program=EmulatedStep(config, variables, update=off_momentum))
    with pytest.raises(AssertionError, match="momentum of .* in step \\d+ of 10, from the program's state before it"):
        assert_matches(result)


def test_changing_float_learning_rate_does_not_recompile(monkeypatch):
    compiles = []
    real = backend.compile_text

    def counting(text, devices, **options):
        compiles.append(text)
        return real(text, devices, **options)

    monkeypatch.setattr(backend, "compile_text", counting)
    config = SGDConfig.create(learning_rate=0.1, momentum=0.9, weight_decay=0.05, clipnorm=1.0)
    lrs = [0.1, 0.05, 0.2, 0.01, 0.3, 0.1, 0.0, 0.07, 0.15, 0.02]
    result = run_against_reference(config, model(), ONE_DEVICE, steps=10, lr_schedule_of_values=lrs)
    assert len(compiles) == 1, "changing the learning rate recompiled the step"
    assert result.compiled.has_lr_input
    assert result.learning_rates == [float(np.float32(x)) for x in lrs]
    assert_matches(result)
    # not vacuous: the same run at a fixed rate ends elsewhere
    fixed = run_against_reference(config, model(), ONE_DEVICE, steps=10)
    assert not np.array_equal(result.final_reference.variables[2], fixed.final_reference.variables[2])


def test_mixed_layouts_on_eight_devices():
    """Stage 0 on "batch=2,model=4": XLA's partitioner inserts the collectives of the norms."""
    mesh = Mesh.parse("batch=2,model=4")
    variables = [
        VarSpec.create("dense/kernel", [8, 16], "float32", mesh, ["unsharded", "model"]),
        VarSpec.create("dense/bias", [16], "float32", mesh, ["model"], decay=False),
        VarSpec.create("embedding", [4, 8, 6], "float32", mesh, ["batch", "model", "unsharded"]),
        VarSpec.create("head", [6, 5], "float32", mesh),
        VarSpec.create("scale", [], "float32", mesh),
    ]
    for kwargs in (FULL, dict(learning_rate=0.1, momentum=0.9, clipnorm=1.0, use_ema=True)):
        config = SGDConfig.create(**kwargs)
        result = run_against_reference(config, variables, mesh, steps=10, seed=1)
        _check_clipping_exercised(result)
        assert_matches(result)


# ---- the seed's usage examples, through the compiled step ------------------------------------


def _seed_run(config, steps):
    """var = 1.0, loss = var**2 / 2, so the gradient is the variable itself; returns var after each step."""
    spec = [VarSpec.create("var", [], "float32", ONE_DEVICE)]
    cs = compile_step(config, spec, ONE_DEVICE)
    state = cs.initial_state([np.float32(1.0)])
    out = []
    for _ in range(steps):
        var = cs.host(state)[("variable", 0)]
        state = cs.step(state, [var])
        out.append(cs.host(state)[("variable", 0)])
    return out


def test_seed_example_plain_sgd():
    (var,) = _seed_run(SGDConfig.create(0.1), 1)
    assert var.dtype == np.float32
    assert var.tobytes() == np.float32(0.9).tobytes()


def test_seed_example_momentum():
    v1, v2 = _seed_run(SGDConfig.create(0.1, momentum=0.9), 2)
    first, second = np.float32(1.0) - v1, v1 - v2
    assert abs(float(first) - 0.100000024) <= 1e-7
    assert abs(float(second) - float(np.float32(0.18))) <= 1e-7


# ---- the in-program learning rate is schedule(step) ----------------------------------------


def _cosine_term(schedule, step: int) -> tuple[float, float] | None:
    """For the cosine kinds, (d lr / d cos, cos) at `step`, in float64; None where no cosine is used."""
    if isinstance(schedule, schedules.CosineDecay):
        s, decay, peak = float(step), float(schedule.decay_steps), float(schedule.initial_learning_rate)
        if schedule.warmup_target is not None:
            warm = float(schedule.warmup_steps)
            s = min(s, decay + warm)
            if s < warm:
                return None
            s, peak = s - warm, float(schedule.warmup_target)
        s = min(s, decay)
        return peak * (1 - schedule.alpha) * 0.5, math.cos(math.pi * s / decay)
    if isinstance(schedule, schedules.CosineDecayRestarts):
        t = float(schedule.t_mul)
        f = step / float(schedule.first_decay_steps)
        if t == 1.0:
            i = math.floor(f)
            f -= i
        else:
            i = math.floor(math.log(1 - f * (1 - t)) / math.log(t))
            f = (f - (1 - t**i) / (1 - t)) / t**i
        k = float(schedule.initial_learning_rate) * (1 - schedule.alpha) * 0.5 * float(schedule.m_mul) ** i
        return k, math.cos(math.pi * f)
    return None


def _lr_tolerance(schedule, step: int, want: np.float32) -> float:
    """1 ulp of the value (docs/numerics.md §5: transcendentals differ by 1 ulp between libraries).

    For the cosine kinds, also 1 ulp of cos(...) and 1 ulp of 1 + cos(...), times d lr / d cos:
    where 1 + cos cancels (cos near -1), a 1-ulp difference of cos is several ulp of the rate.
    Measured: np.cos(float32(0.8*pi)) is 0.55 ulp off and XLA's 0.45 ulp the other way, so
    CosineDecay(0.01, 5, warmup_target=0.1, warmup_steps=3) at step 7 differs by 3 ulp of the rate.
    """
    tol = float(np.spacing(np.abs(np.float32(want))))
    term = _cosine_term(schedule, step)
    if term is not None:
        k, cos = term
        tol += k * (float(np.spacing(np.float32(abs(cos)))) + float(np.spacing(np.float32(1 + cos))))
    return tol


@pytest.mark.parametrize("schedule", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_schedule_value_in_program(schedule):
    """Plain SGD with gradient 1: the momentum slot is m = (-1)*lr + m*0 = -lr exactly (an FMA too),
    so it reads out the learning rate the program used at every step; it must be schedule(step)."""
    config = SGDConfig.create(learning_rate=schedule)
    cs = compile_step(config, [VarSpec.create("x", [], "float32", ONE_DEVICE)], ONE_DEVICE)
    state = cs.initial_state([np.float32(0.0)])
    off = []
    for step in range(30):
        state = cs.step(state, [np.float32(1.0)])
        host = cs.host(state)
        assert int(host[("iterations", None)]) == step + 1
        got, want = -host[("momentum", 0)], schedule(step)
        tol = _lr_tolerance(schedule, step, want)
        if not abs(float(got) - float(want)) <= tol:
            ulps = abs(float(got) - float(want)) / float(np.spacing(np.abs(want)))
            off.append(f"step {step}: program {float(got)!r}, schedule {float(want)!r} ({ulps:.3g} ulp, "
                       f"allowed {tol / float(np.spacing(np.abs(want))):.3g})")
    assert not off, f"{schedule!r}: " + "; ".join(off)
