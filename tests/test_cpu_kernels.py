"""sgdgen's CPU kernel (csrc/sum_squares.cc) and where it is used (sgdgen.runtime.cpu_kernels).

The kernel replaces XLA's float64 reduce in a float32 norm: the sum over g of float64(g*g), the
products rounded in float32 (SEMANTICS §6). A float64 sum of n non-negative terms, in any order,
is within (n - 1) * 2^-53 (relative) of the exact sum (math.fsum of the same float32 products);
that is the bound checked, for the kernel and for XLA's reduce alike. A compiled step with the
kernel and one without run the same options and must both meet the reference at the suite's
tolerance (docs/numerics.md §4); a stored portable module and jax.export never carry the call.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgdgen import backend
from sgdgen.codegen.pipeline import run_pipeline
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Mesh, VarSpec
from sgdgen.runtime import cpu_kernels
from support.stepdriver import assert_matches, compile_step, run_against_reference

TARGET = "sgdgen_sum_squares_f32"


@pytest.fixture
def without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.ENV, "0")


def test_the_install_built_the_kernel_library() -> None:
    # setup.py builds it optionally (a machine without a C++ compiler still installs); the machines
    # this project is tested on have one, so a silently skipped build is a failure here.
    assert cpu_kernels.library_path() is not None, "csrc/*.cc were not built: see setup.py's warning"
    assert cpu_kernels.available() and cpu_kernels.fingerprint().startswith("sgdgen-cpu-kernels-")


def _kernel_sum(x: np.ndarray) -> float:
    cpu_kernels.register()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((), jnp.float64))
    with jax.enable_x64(True):
        return float(jax.jit(call)(jnp.asarray(x)))


@pytest.mark.parametrize("n", [1, 15, 17, (1 << 18) - 1, (1 << 18) + 1, 3 * (1 << 18) + 5, (1 << 21) + 3])
def test_kernel_sum_is_within_the_float64_bound_of_the_exact_sum(n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))).astype(np.float32)
    exact = math.fsum((x * x).astype(np.float64).tolist())  # the float32 products, widened exactly
    got = _kernel_sum(x)
    assert abs(got - exact) <= (n - 1) * 2.0 ** -53 * exact


def test_one_call_sums_many_operands_each_within_the_bound() -> None:
    # the norms of many small gradients in one call (and a large one split into blocks beside them)
    rng = np.random.default_rng(7)
    sizes = [0, 1, 96, 6144, 25600, (1 << 18) + 3, 17]
    xs = [(rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32) for n in sizes]
    cpu_kernels.register()
    call = jax.ffi.ffi_call(TARGET, [jax.ShapeDtypeStruct((), jnp.float64)] * len(xs))
    with jax.enable_x64(True):
        got = [float(v) for v in jax.jit(lambda *a: call(*a))(*map(jnp.asarray, xs))]
    for x, g in zip(xs, got):
        exact = math.fsum((x * x).astype(np.float64).tolist())
        assert abs(g - exact) <= max(x.size - 1, 0) * 2.0 ** -53 * exact


def test_kernel_propagates_inf_and_nan_as_the_reduce_does() -> None:
    x = np.ones(1 << 19, np.float32)
    x[7] = np.float32(3e38)  # its square overflows float32 to inf, as the program's multiply does
    assert _kernel_sum(x) == math.inf
    x[1 << 18] = np.nan  # in the second block: a NaN from any thread reaches the sum
    assert math.isnan(_kernel_sum(x))


BLOCK = 1 << 18  # the kernel's elements per block (kBlock in csrc/sum_squares.cc)
USAGE = "sgdgen_sum_squares_f32 takes N float32 arrays and returns N float64 scalars, or one"


def _kernel_sums(xs: list[np.ndarray], results: int) -> list[float]:
    """One call over `xs` with `results` float64 scalar results (N: one each; 1: one for all)."""
    cpu_kernels.register()
    call = jax.ffi.ffi_call(TARGET, [jax.ShapeDtypeStruct((), jnp.float64)] * results)
    with jax.enable_x64(True):
        return [float(v) for v in jax.jit(lambda *a: call(*a))(*map(jnp.asarray, xs))]


def _gradients(sizes: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32) for n in sizes]


def test_one_result_over_small_operands_is_their_block_sums_added_in_operand_order() -> None:
    # every operand at most one block: the per-operand form's results ARE the block sums, and the
    # one-result form adds the blocks in operand order from 0.0, so the same float64 additions
    # in Python give its result exactly (several blocks and more than 2 blocks' elements: the pool)
    def in_order(sums: list[float]) -> float:
        total = 0.0
        for s in sums:
            total += s
        return total

    xs = _gradients([1, 0, 17, BLOCK, 96, BLOCK - 1, 0, BLOCK, 5], seed=3)
    assert _kernel_sums(xs, 1) == [in_order(_kernel_sums(xs, len(xs)))]
    # 1 then four 2^-54 (each rounds away on 1) against four 2^-54 (2^-52 together) then 1: two
    # orders of the same blocks that give different sums, each the kernel's in its operand order
    tiny = [np.array([1.0], np.float32)] + [np.array([2.0 ** -27], np.float32)] * 4
    forward, backward = in_order(_kernel_sums(tiny, 5)), in_order(_kernel_sums(tiny[::-1], 5))
    assert (forward, backward) == (1.0, 1.0 + 2.0 ** -52)
    assert _kernel_sums(tiny, 1) == [forward] and _kernel_sums(tiny[::-1], 1) == [backward]


@pytest.mark.parametrize("sizes", [[BLOCK + 3, 0, 1, 3 * BLOCK + 5, 4097], [2, 2 * BLOCK, 1], [7, 9]])
def test_one_result_over_many_operands_is_the_sum_of_the_per_operand_results(sizes: list[int]) -> None:
    # Both are float64 sums of the same n = sum(sizes) non-negative terms (the float32 products) in
    # different orders, each within (n - 1) * 2^-53 (relative) of the exact sum S (the N results:
    # sum(n_i - 1) roundings inside the calls, N - 1 adding them up), so they differ by at most
    # 2 * (n - 1) * 2^-53 * S; and both are within the bound of S itself.
    xs = _gradients(sizes, seed=sum(sizes))
    n = sum(sizes)
    exact = math.fsum(float(v) for x in xs for v in (x * x).astype(np.float64))
    each = _kernel_sums(xs, len(xs))
    [together] = _kernel_sums(xs, 1)
    assert abs(together - exact) <= (n - 1) * 2.0 ** -53 * exact
    assert abs(together - math.fsum(each)) <= 2 * (n - 1) * 2.0 ** -53 * exact
    assert together > 0.5 * exact  # not one operand's sum alone


def test_one_result_with_one_nonempty_operand_is_that_operands_sum_exactly() -> None:
    # empty operands are empty blocks (sum +0.0) around the one operand's blocks: the same additions
    [x] = _gradients([3 * BLOCK + 11], seed=5)
    alone = _kernel_sum(x)
    empty = np.zeros(0, np.float32)
    assert _kernel_sums([empty, x, empty], 1) == [alone]
    assert _kernel_sums([x], 1) == [alone]  # N == 1: the per-operand form, the same sum


def test_one_result_propagates_inf_and_nan_from_any_operand() -> None:
    xs = [np.ones(5, np.float32), np.ones(BLOCK + 1, np.float32), np.ones(3, np.float32)]
    assert _kernel_sums(xs, 1) == [5.0 + BLOCK + 1 + 3]
    xs[2][1] = np.float32(3e38)  # squares to inf in float32
    assert _kernel_sums(xs, 1) == [math.inf]
    xs[1][BLOCK] = np.nan  # the second operand's second block
    assert math.isnan(_kernel_sums(xs, 1)[0])


def test_kernel_refuses_no_operands_and_a_result_count_neither_n_nor_one() -> None:
    x = np.ones(8, np.float32)
    with pytest.raises(Exception, match=USAGE):
        _kernel_sums([], 1)
    with pytest.raises(Exception, match=USAGE):
        _kernel_sums([x, x, x], 2)
    with pytest.raises(Exception, match=USAGE):
        _kernel_sums([x], 2)
    assert _kernel_sums([x, x, x], 3) == [8.0] * 3 and _kernel_sums([x, x, x], 1) == [24.0]


def _hlo(result) -> str:
    return backend.hlo_text(result.compiled.exe.executable)


LARGE = [VarSpec.create("big/kernel", [320, 256], "float32", Mesh(())),  # all three @main arguments: one call
         VarSpec.create("big/bias", [70000], "float32", Mesh(()), decay=False),
         VarSpec.create("small", [31, 7], "float32", Mesh(()))]
FULL = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.05, global_clipnorm=1.0,
            use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)


@pytest.mark.parametrize("kwargs", [FULL, dict(learning_rate=0.1, momentum=0.9, clipnorm=1.0)],
                         ids=["global_clipnorm", "clipnorm"])
def test_step_with_the_kernel_matches_the_reference(kwargs: dict) -> None:
    config = SGDConfig.create(**kwargs)
    result = run_against_reference(config, LARGE, Mesh(()), steps=8, seed=3, transform=run_pipeline)
    hlo = _hlo(result)
    assert hlo.count(TARGET) == 1 and "(f64[], f64[], f64[]) custom-call(" in hlo, \
        "the three gradients' norms were not given to one kernel call"
    assert_matches(result)


def test_step_without_the_kernel_matches_the_reference_too(without_kernels: None) -> None:
    config = SGDConfig.create(**FULL)
    result = run_against_reference(config, LARGE, Mesh(()), steps=8, seed=3, transform=run_pipeline)
    assert TARGET not in _hlo(result)
    assert_matches(result)


def test_sharded_step_calls_the_kernel_on_each_devices_shard() -> None:
    mesh = Mesh.parse("batch=2,model=4")
    variables = [VarSpec.create("w", [1024, 256], "float32", mesh, ["unsharded", "model"]),  # 65,536 per device
                 VarSpec.create("b", [256], "float32", mesh, ["model"])]
    config = SGDConfig.create(**FULL)
    result = run_against_reference(config, variables, mesh, steps=4, seed=5, transform=run_pipeline)
    hlo = _hlo(result)
    assert hlo.count(TARGET) == 1 and "f32[1024,64]" in hlo  # the call takes the local shard
    assert_matches(result)


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {"kernel": jnp.asarray(rng.standard_normal((320, 256)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(7), jnp.float32)}


def test_jax_step_in_a_jit_calls_the_kernel_and_jax_export_does_not() -> None:
    import sgdgen

    params = _params()
    step = sgdgen.jax_step(None, params, learning_rate=0.1, momentum=0.9, global_clipnorm=1.0)
    state = step.init(params)
    grads = jax.tree.map(lambda p: p * 0.5, params)
    train = jax.jit(lambda p, g, s: step(p, g, s))
    assert TARGET in train.lower(params, grads, state).compile().as_text()
    exported = jax.export.export(train)(params, grads, state)
    assert TARGET not in exported.mlir_module()  # portable: the plain float64 reduce
    got, want = exported.call(params, grads, state), train(params, grads, state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # both within 1e-6 of the reference
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=0)


def _save_and_load_in_a_new_process(tmp_path, env: dict[str, str]) -> str:
    import sgdgen

    params = _params()
    opt = sgdgen.SGD(learning_rate=0.1, momentum=0.9, global_clipnorm=1.0)
    opt.build([sgdgen.Variable(np.asarray(v), name=k) for k, v in params.items()])
    art = tmp_path / "art"
    opt.save_artifact(str(art))
    from sgdgen.io import artifact

    assert TARGET not in (art / "step.mlir").read_text()  # the portable module: XLA's reduce
    assert TARGET in backend.hlo_text(artifact.read(str(art)).executable().executable)  # the CPU executable
    child = f"""
import warnings, numpy as np, sgdgen
warnings.simplefilter("error")  # a rebuild from step.mlirbc warns: the stored executable must be used
rng = np.random.default_rng(0)
vs = [sgdgen.Variable(rng.standard_normal((320, 256)).astype(np.float32), name="kernel"),
      sgdgen.Variable(rng.standard_normal(7).astype(np.float32), name="bias")]
opt = sgdgen.SGD.load_artifact({str(art)!r}, vs)
opt.apply_gradients([(np.ones(v.shape, np.float32), v) for v in vs])
print("ok", float(np.asarray(vs[0].value)[0, 0]))
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_artifact_executable_calls_the_kernel_and_loads_in_a_new_process(tmp_path, subprocess_env) -> None:
    out = _save_and_load_in_a_new_process(tmp_path, subprocess_env)
    assert out.startswith("ok")


def test_artifact_compiled_with_kernels_is_rebuilt_where_they_are_off(tmp_path, subprocess_env) -> None:
    env = {**subprocess_env, cpu_kernels.ENV: "0"}  # the child's compile options differ: a warning, then a rebuild
    with pytest.raises(AssertionError, match="compile options"):
        _save_and_load_in_a_new_process(tmp_path, env)


def test_a_child_started_in_the_checkout_uses_the_same_kernel_library(subprocess_env) -> None:
    # Run from the repository root, a child imports sgdgen from the checkout; beside a non-editable
    # install (CI's) the checkout has no built library, so it must find the installed one, or the
    # child would see other compile options than this process and reject its artifacts.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from sgdgen.runtime import cpu_kernels; print(cpu_kernels.fingerprint())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=subprocess_env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == cpu_kernels.fingerprint()
