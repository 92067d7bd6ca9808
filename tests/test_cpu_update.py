"""sgdgen's one-pass update kernel (csrc/sgd_update.cc) and the pass that calls it (passes/cpu_update.py).

The kernel computes one variable's update with the IR's float32 operations in the IR's order, so
it is checked bit for bit against `sgdgen/reference.py` (SEMANTICS in NumPy, whose float32
operations are IEEE operations as the kernel's are) for every choice of its flags. The pass
must find every large float32 update the generator emits, for every option (else the fast path
is silently lost when a template changes), and compiled steps with it must meet the reference
over many steps, on one device and on a mesh's local shards.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgdgen import backend, reference
from sgdgen.codegen.generate import generate_text
from sgdgen.codegen.pipeline import run_pipeline
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.schedules import ExponentialDecay
from sgdgen.frontend.spec import Mesh, VarSpec
from sgdgen.passes.cpu_update import CONSTANTS, Flags
from sgdgen.runtime import cpu_kernels
from support.stepdriver import assert_matches, run_against_reference

TARGET = "sgdgen_sgd_update_f32"
WD, MOM, EMA_M, C, LR, S = 0.05, 0.9, 0.99, 0.5, 0.1, 0.7


def _bits(x: float) -> int:
    return int(np.float32(x).view(np.uint32))


def _constants(f: Flags) -> np.ndarray:
    values = {"wd": reference.cast_T(WD, np.float32), "mom": reference.cast_T(MOM, np.float32),
              "keep": reference.to_T(EMA_M, np.float32), "take": reference.to_T(1.0 - EMA_M, np.float32),
              "c": reference.to_T(C, np.float32), "c_neg": reference.to_T(-C, np.float32)}
    return np.array([_bits(values[k]) for k in CONSTANTS], np.int64)


def _kernel(f: Flags, g, w, m, a, *, due: bool, skip: bool, in_place: bool = True) -> list[np.ndarray]:
    cpu_kernels.register()
    n = len(g)
    arrays = [g, w, m, a] if f.ema else [g, w, m]
    scalars = [np.float32(LR)] + ([np.float32(S)] if f.clip in (1, 2) else [])
    scalars += ([np.bool_(due)] if f.overwrite else []) + ([np.bool_(skip)] if f.skip else [])
    results = len(arrays) - 1
    call = jax.ffi.ffi_call(TARGET, [jax.ShapeDtypeStruct((n,), jnp.float32)] * results,
                            input_output_aliases={1 + k: k for k in range(results)} if in_place else None)
    run = jax.jit(lambda *xs: call(*xs, flags=np.array(f.words(), np.int64), constants=_constants(f)),
                  donate_argnums=tuple(range(1, 1 + results)) if in_place else ())
    out = run(*[jnp.asarray(x) for x in arrays], *scalars)
    return [np.asarray(x) for x in out]


def _reference(f: Flags, g, w, m, a, *, due: bool, skip: bool) -> list[np.ndarray]:
    """The kernel's formula from reference.py's rules (SEMANTICS §4.5-4.10), given the clip's scalar."""
    if f.skip and skip:
        return [w, m, a] if f.ema else [w, m]
    with np.errstate(all="ignore"):
        if f.clip == 1:
            g = g * np.float32(S)  # the last step of clip_by_global_norm, with its scale
        elif f.clip == 2:
            g = (g * reference.to_T(C, np.float32)) / np.float32(S)  # clip_by_norm with s = max(norm, c)
        elif f.clip == 3:
            g = reference.clip_by_value(g, C)
    if f.decay:
        w = reference.weight_decay(w, WD, LR)
    w, m = reference.sgd_update(w, m, g, LR, MOM, f.nesterov)
    if not f.ema:
        return [w, m]
    a = reference.ema_update(a, w, EMA_M)
    return [a.copy() if f.overwrite and due else w, m, a]


def _same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    nan = np.isnan(want)
    return bool(np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32),
                                                                      want[~nan].view(np.uint32)))


def _inputs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal(n) * np.exp2(rng.integers(-8, 8, n))).astype(np.float32) for _ in range(4)]
    xs[0][:6] = [np.inf, -np.inf, np.nan, 0.0, -0.0, C]  # gradients at the clip value and beyond
    xs[1][6:9] = [np.inf, -0.0, np.nan]
    return xs


ALL_FLAGS = [Flags(clip, decay, nesterov, ema, overwrite, skip)
             for clip, decay, nesterov, skip in itertools.product(range(4), (False, True), (False, True), (False, True))
             for ema, overwrite in ((False, False), (True, False), (True, True))]


@pytest.mark.parametrize("f", ALL_FLAGS, ids=lambda f: "-".join(map(str, f.words())))
def test_kernel_is_the_reference_bit_for_bit(f: Flags) -> None:
    g, w, m, a = _inputs(1000 + 17, seed=sum(f.words()))
    for due, skip in itertools.product((False, True) if f.overwrite else (False,), (False, True) if f.skip else (False,)):
        got = _kernel(f, g, w.copy(), m.copy(), a.copy(), due=due, skip=skip)
        want = _reference(f, g, w, m, a, due=due, skip=skip)
        for role, x, y in zip("wma", got, want):
            assert _same_bits(x, y), f"{role}' differs from the reference (flags {f.words()}, due={due}, skip={skip})"


def test_kernel_on_the_pool_and_out_of_place_gives_the_same_bits() -> None:
    # several tasks of 65,536 elements (threads), and results not aliased to their operands (the
    # kernel copies first): both the reference's bits, and the operands left as they were
    f = Flags(1, True, True, True, True, False)
    g, w, m, a = _inputs(3 * 65536 + 7, seed=11)
    keep = [x.copy() for x in (w, m, a)]
    want = _reference(f, g, w, m, a, due=True, skip=False)
    for in_place in (True, False):
        got = _kernel(f, g, w, m, a, due=True, skip=False, in_place=in_place)
        assert all(_same_bits(x, y) for x, y in zip(got, want))
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip((w, m, a), keep))


def test_kernel_refuses_a_call_that_does_not_fit_its_flags() -> None:
    cpu_kernels.register()
    call = jax.ffi.ffi_call(TARGET, [jax.ShapeDtypeStruct((4,), jnp.float32)] * 2)
    x = jnp.ones(4, jnp.float32)
    with pytest.raises(Exception, match="takes 5 operands and 2 results"):  # clip 1 wants the scale too
        jax.jit(lambda *xs: call(*xs, flags=np.array([1, 0, 0, 0, 0, 0], np.int64),
                                 constants=np.zeros(6, np.int64)))(x, x, x, jnp.float32(0.1))


# ---- gradient segments: g as its pieces (flags' 7th word K) -------------------------------

TASK = 1 << 16  # the kernel's elements per task (kTask in csrc/sgd_update.cc)


def _segmented_kernel(f: Flags, pieces: list[np.ndarray], w, m, a, *, due: bool, skip: bool,
                      in_place: bool = True) -> list[np.ndarray]:
    """The kernel called with g as K segments g_1..g_K (flags f.words() + [K]), then w, m, [a], scalars."""
    cpu_kernels.register()
    n, k = len(w), len(pieces)
    arrays = [w, m, a] if f.ema else [w, m]
    scalars = [np.float32(LR)] + ([np.float32(S)] if f.clip in (1, 2) else [])
    scalars += ([np.bool_(due)] if f.overwrite else []) + ([np.bool_(skip)] if f.skip else [])
    results = len(arrays)
    call = jax.ffi.ffi_call(TARGET, [jax.ShapeDtypeStruct((n,), jnp.float32)] * results,
                            input_output_aliases={k + r: r for r in range(results)} if in_place else None)
    run = jax.jit(lambda *xs: call(*xs, flags=np.array(f.words() + [k], np.int64), constants=_constants(f)),
                  donate_argnums=tuple(range(k, k + results)) if in_place else ())
    out = run(*[jnp.asarray(x) for x in (*pieces, *arrays)], *scalars)
    return [np.asarray(x) for x in out]


# segment sizes over n = 3 * TASK + 123 elements (4 tasks, 3 helpers on the pool): 1-element and
# empty segments (first, middle, last), one ending exactly on a task boundary, ones crossing one
# or two task boundaries, and the last task's short range split too
N_SEGMENTED = 3 * TASK + 123
LAYOUTS = {
    "small_and_empty": [1, 0, TASK - 1, 3, 70000, 1, 0, 61000, N_SEGMENTED - (TASK + 3 + 70000 + 1 + 61000), 0],
    "spanning": [0, 140000, 1, 1, N_SEGMENTED - 140002],
    "one_per_task_offset": [TASK + 5, TASK - 10, TASK + 5, 123],
}
SEGMENT_FLAGS = [Flags(0, False, False, False, False, False),  # plain momentum
                 Flags(1, True, True, True, False, False),  # global clip, decay, Nesterov, EMA
                 Flags(3, False, False, True, True, True)]  # clipvalue, EMA with overwrite, skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("f", SEGMENT_FLAGS, ids=lambda f: "-".join(map(str, f.words())))
def test_segmented_gradient_gives_the_concatenated_calls_bits(f: Flags, layout: str) -> None:
    sizes = LAYOUTS[layout]
    assert sum(sizes) == N_SEGMENTED and min(sizes) >= 0
    g, w, m, a = _inputs(N_SEGMENTED, seed=len(sizes) + sum(f.words()))
    g[TASK - 1:TASK + 2] = [np.nan, np.inf, -C]  # specials where segments and tasks meet too
    pieces = np.split(g, np.cumsum(sizes)[:-1])
    assert [len(p) for p in pieces] == sizes
    for due, skip in itertools.product((False, True) if f.overwrite else (False,), (False, True) if f.skip else (False,)):
        want = _kernel(f, g, w.copy(), m.copy(), a.copy(), due=due, skip=skip)
        got = _segmented_kernel(f, [p.copy() for p in pieces], w.copy(), m.copy(), a.copy(), due=due, skip=skip)
        assert len(got) == len(want)
        for role, x, y in zip("wma", got, want):
            assert _same_bits(x, y), f"{role}' differs from the unsegmented call ({layout}, flags {f.words()}, due={due}, skip={skip})"
        if not (f.skip and skip):  # the update did something (else both trivially keep the operands)
            assert not _same_bits(got[1], m)


def test_segmented_gradient_out_of_place_gives_the_same_bits_and_keeps_the_operands() -> None:
    f = Flags(1, True, True, True, True, False)
    g, w, m, a = _inputs(N_SEGMENTED, seed=23)
    pieces = np.split(g, np.cumsum(LAYOUTS["small_and_empty"])[:-1])
    keep = [x.copy() for x in (w, m, a)]
    want = _reference(f, g, w, m, a, due=True, skip=False)
    got = _segmented_kernel(f, pieces, w, m, a, due=True, skip=False, in_place=False)
    assert all(_same_bits(x, y) for x, y in zip(got, want))
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip((w, m, a), keep))


def _raw_call(flags: list[int], operands: list, results: int = 2, n: int = 4):
    cpu_kernels.register()
    call = jax.ffi.ffi_call(TARGET, [jax.ShapeDtypeStruct((n,), jnp.float32)] * results)
    return jax.jit(lambda *xs: call(*xs, flags=np.array(flags, np.int64), constants=np.zeros(6, np.int64)))(*operands)


def test_kernel_refuses_segments_that_do_not_fit_the_operands() -> None:
    x, half, lr = jnp.ones(4, jnp.float32), jnp.ones(2, jnp.float32), jnp.float32(0.1)
    out = _raw_call([0, 0, 0, 0, 0, 0, 2], [half, half, x, x, lr])  # K = 2: g_1, g_2, w, m, lr
    assert all(np.isfinite(np.asarray(r)).all() for r in out)
    with pytest.raises(Exception, match="sgdgen_sgd_update_f32: takes 6 operands and 2 results for its flags, got 5"):
        _raw_call([0, 0, 0, 0, 0, 0, 3], [half, half, x, x, lr])  # K = 3 wants one more segment
    with pytest.raises(Exception, match="sgdgen_sgd_update_f32: takes 4 operands and 2 results for its flags, got 5"):
        _raw_call([0, 0, 0, 0, 0, 0, 1], [half, half, x, x, lr])  # K = 1 is the unsegmented call
    with pytest.raises(Exception, match="sgdgen_sgd_update_f32: g, w, m and a differ in element count"):
        _raw_call([0, 0, 0, 0, 0, 0, 2], [half, x, x, x, lr])  # the segments' counts add up to 6, not 4
    with pytest.raises(Exception, match=r"sgdgen_sgd_update_f32: flags must be .*segments >= 1"):
        _raw_call([0, 0, 0, 0, 0, 0, 0], [x, x, lr])  # K = 0: no gradient at all
    with pytest.raises(Exception, match=r"sgdgen_sgd_update_f32: flags must be"):
        _raw_call([0, 0, 0, 0, 0, 0, 2, 1], [half, half, x, x, lr])  # 8 words


# ---- the pass finds every update the generator emits --------------------------------------

MESH = Mesh(())
LARGE = [VarSpec.create("big/kernel", [320, 256], "float32", MESH),
         VarSpec.create("big/bias", [70000], "float32", MESH, decay=False),
         VarSpec.create("small", [31, 7], "float32", MESH)]  # under min-elements: XLA's
FULL = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, global_clipnorm=1.0,
            use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
CONFIGS = {
    "plain": dict(learning_rate=0.1),
    "momentum": dict(learning_rate=0.1, momentum=0.9),
    "nesterov_decay": dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
    "clipnorm": dict(learning_rate=0.1, momentum=0.9, clipnorm=1.0),
    "clipvalue_ema": dict(learning_rate=0.1, momentum=0.5, clipvalue=0.01, use_ema=True, ema_momentum=0.9),
    "full_overwrite": FULL,
    "skip_schedule": dict(learning_rate=ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5), momentum=0.9, weight_decay=0.05,
        global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=2, skip_nonfinite=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_pass_finds_every_large_float32_update_the_generator_emits(name: str) -> None:
    config = SGDConfig.create(**CONFIGS[name])
    text = cpu_kernels.rewrite(run_pipeline(generate_text(config, LARGE, MESH)))
    assert text.count(f"custom_call @{TARGET}(") == 2, f"{name}: an update template no longer matches the kernel"


@pytest.mark.parametrize("name", ["full_overwrite", "clipvalue_ema"])  # skip: tests/test_nonfinite.py, "1-large"
def test_steps_with_the_update_kernel_match_the_reference(name: str) -> None:
    config = SGDConfig.create(**CONFIGS[name])
    result = run_against_reference(config, LARGE, MESH, steps=8, seed=3, transform=run_pipeline)
    assert backend.hlo_text(result.compiled.exe.executable).count(f"custom_call_target=\"{TARGET}\"") == 2
    assert_matches(result)


def test_sharded_step_updates_each_devices_shard_in_one_call() -> None:
    mesh = Mesh.parse("batch=2,model=4")
    variables = [VarSpec.create("w", [1024, 256], "float32", mesh, ["unsharded", "model"]),  # 65,536 per device
                 VarSpec.create("b", [256], "float32", mesh, ["model"])]
    result = run_against_reference(SGDConfig.create(**FULL), variables, mesh, steps=4, seed=5, transform=run_pipeline)
    hlo = backend.hlo_text(result.compiled.exe.executable)
    calls = [line for line in hlo.splitlines() if f"custom_call_target=\"{TARGET}\"" in line]
    assert len(calls) == 1 and calls[0].count("f32[1024,64]") == 3  # its results: the local shard
    assert_matches(result)


def test_jax_step_in_a_jit_updates_through_the_kernel_and_jax_export_does_not() -> None:
    import sgdgen

    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.standard_normal((320, 256)), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(7), jnp.float32)}
    step = sgdgen.jax_step(None, params, learning_rate=0.1, momentum=0.9, nesterov=True, use_ema=True)
    state = step.init(params)
    grads = jax.tree.map(lambda p: p * 0.5, params)
    train = jax.jit(lambda p, g, s: step(p, g, s), donate_argnums=(0, 2))
    compiled = train.lower(params, grads, state).compile().as_text()
    assert compiled.count(f"custom_call_target=\"{TARGET}\"") == 1
    exported = jax.export.export(jax.jit(lambda p, g, s: step(p, g, s)))(params, grads, state)
    assert TARGET not in exported.mlir_module()  # portable: plain StableHLO
    want = exported.call(params, grads, state)
    got = train(jax.tree.map(jnp.copy, params), grads, jax.tree.map(jnp.copy, state))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=0)
