"""Gradient segments: a flat bucket's gradient taken as its members' gradients (`StepABI`).

The calling convention (one argument per member, in offset order, where the bucket's one
gradient would be), the program (the members' concatenate is the bucket's gradient, so the
step is the flat step's), the CPU executable (the kernels read the pieces where they lie: no
concatenate is left), and `sgdgen.SGD(buckets=True)`, which feeds per-variable gradients to that
program once its background compile is done and packs them until then.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import sgdgen
from sgdgen.codegen.abi import StepABI, StepState
from sgdgen.errors import ConfigError, StepInputError
from sgdgen.frontend import buckets as bucketing
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Layout, Mesh, VarSpec
from sgdgen.runtime import background, cpu_kernels
from sgdgen.runtime.core import Step
from sgdgen.runtime.program import StepProgram

ONE = Mesh(())
# 40 members under the bucket threshold, 83,200 float32 elements together: above the kernels'
# 65,536-element minimum, so the CPU executable calls them; plus one variable with its own buffer
SHAPES = [(64, 64), (64,)] * 20 + [(300, 300)]
BENCH = dict(momentum=0.9, nesterov=True, weight_decay=4e-3, global_clipnorm=1.0, use_ema=True, ema_momentum=0.99)
ELEMENTWISE = dict(momentum=0.9, nesterov=True, weight_decay=1e-2, use_ema=True, ema_momentum=0.9,
                   ema_overwrite_frequency=3)


def _specs(mesh: Mesh = ONE) -> list[VarSpec]:
    return [VarSpec(f"layer{i}/{'bias' if len(s) == 1 else 'kernel'}", s, "float32", Layout.replicated(mesh, len(s)))
            for i, s in enumerate(SHAPES)]


def _plan(mesh: Mesh = ONE) -> bucketing.BucketPlan:
    return bucketing.plan(_specs(mesh), mesh)


def _programs(options: dict, mesh: Mesh = ONE) -> tuple[bucketing.BucketPlan, StepProgram, StepProgram]:
    plan = _plan(mesh)
    config = SGDConfig.create(0.1, **options)
    flat = StepProgram(config, plan.buckets, mesh)
    return plan, flat, StepProgram(config, plan.buckets, mesh, gradient_segments=plan.gradient_segments())


# ---- the calling convention ------------------------------------------------------------------

def test_abi_puts_one_argument_per_member_where_the_buckets_gradient_was() -> None:
    plan, flat, seg = _programs(dict(momentum=0.9))
    (b,) = [b for b, ks in enumerate(plan.contents) if not plan.members[ks[0]].own]
    members = plan.contents[b]
    grads = [s for s in seg.abi.inputs if s.role == "gradient"]
    assert [s.var for s in grads] == [0] * len(members) + [1]  # the bucket's pieces, then the own buffer's
    assert [s.segment for s in grads] == [*range(len(members)), None]
    assert [s.shape for s in grads[:-1]] == [plan.variables[k].shape for k in members]
    assert seg.abi.index("gradient", 0) == flat.abi.index("gradient", 0)  # its first piece
    assert seg.abi.gradient_segments == (len(members), None)
    assert flat.abi.gradient_segments == ()
    assert seg.abi.outputs == flat.abi.outputs  # the state is the flat step's
    assert seg.abi.gradient_positions == frozenset(range(len(flat.abi.outputs), len(seg.abi.inputs) - 1))
    assert seg.abi.to_json()["inputs"][seg.abi.index("gradient", 0) + 1]["segment"] == 1


def test_abi_pack_takes_each_segmented_gradient_as_its_pieces() -> None:
    plan, _, seg = _programs(dict(momentum=0.9))
    n = len(plan.contents[0])
    state = StepState("it", ("m0", "m1"))
    args = seg.abi.pack(state, ["w0", "w1"], [[f"g{j}" for j in range(n)], "h"], "lr")
    assert args == ["it", "w0", "w1", "m0", "m1", *[f"g{j}" for j in range(n)], "h", "lr"]
    with pytest.raises(ValueError, match=f"arrives in {n} pieces, but 2 were given"):
        seg.abi.pack(state, ["w0", "w1"], [["a", "b"], "h"], "lr")


@pytest.mark.parametrize("case", ["sizes", "not_flat", "sharded", "zero", "count"])
def test_abi_refuses_segments_that_do_not_make_the_gradient(case: str) -> None:
    mesh = Mesh("batch=2,model=4")
    v = VarSpec("bucket", (10,), "float32", Layout.replicated(mesh, 1))
    kwargs = dict(use_ema=False, lr_input=True)
    pieces = ((("a", (4,)), ("b", (2, 3))),)
    if case == "sizes":
        with pytest.raises(ConfigError, match="hold 9 elements in 2 pieces, but the variable has 10"):
            StepABI.create([v], mesh, gradient_segments=((("a", (4,)), ("b", (5,))),), **kwargs)
    elif case == "not_flat":
        w = VarSpec("w", (2, 5), "float32", Layout.replicated(mesh, 2))
        with pytest.raises(ConfigError, match="'w' cannot arrive in segments"):
            StepABI.create([w], mesh, gradient_segments=pieces, **kwargs)
    elif case == "sharded":
        w = VarSpec("w", (8,), "float32", Layout(["model"], mesh))
        with pytest.raises(ConfigError, match="'w' cannot arrive in segments"):
            StepABI.create([w], mesh, gradient_segments=((("a", (8,)),),), **kwargs)
    elif case == "zero":
        with pytest.raises(ConfigError, match="without weight-update sharding"):
            StepABI.create([v], mesh, gradient_segments=pieces, shard_update_over="batch", **kwargs)
    else:
        with pytest.raises(ValueError, match="gives 2 entries for 1 variables"):
            StepABI.create([v], mesh, gradient_segments=(pieces[0], None), **kwargs)
    assert len(StepABI.create([v], mesh, gradient_segments=pieces, **kwargs).inputs) == 6  # and the good one


# ---- the program -----------------------------------------------------------------------------

def _run(step: Step, plan: bucketing.BucketPlan, segments: bool, steps: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    init = [rng.normal(size=v.shape).astype(np.float32) for v in plan.variables]
    params = [jax.device_put(x) for x in plan.pack(init)]
    state = step.init(params)
    for _ in range(steps):
        gs = [rng.normal(size=v.shape).astype(np.float32) for v in plan.variables]
        if segments:
            g_in = [gs[ks[0]] if plan.members[ks[0]].own else [gs[k] for k in ks] for ks in plan.contents]
            g_in = [[jax.device_put(x) for x in g] if isinstance(g, list) else jax.device_put(g) for g in g_in]
        else:
            g_in = [jax.device_put(x) for x in plan.pack(gs)]
        new, state = step.apply(state, params, g_in, np.float32(0.1))
        params = list(new)
    return [np.asarray(x) for x in (*params, *state.momenta, *state.averages)]


@pytest.mark.parametrize("name", ["elementwise", "bench"])
def test_the_segmented_step_is_the_flat_step(name: str) -> None:
    """Elementwise rules see the same bucket gradient: the same bits. With global_clipnorm the
    float64 norm is summed per piece instead of per 1 MiB block of the bucket: only the order of
    float64 additions differs (SEMANTICS §6 leaves it free), so the scale may differ by one float32
    ulp and each result by a few ulp of its magnitude over 6 steps (atol 1e-6 * max|x|)."""
    plan, flat, seg = _programs(ELEMENTWISE if name == "elementwise" else BENCH)
    for got, want in zip(_run(Step(seg), plan, True), _run(Step(flat), plan, False), strict=True):
        if name == "elementwise":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * max(np.max(np.abs(want)), 1e-30))


def test_the_cpu_executable_reads_the_pieces_where_they_lie() -> None:
    """With the kernels, neither the norm nor the update needs the concatenate: XLA never
    writes the bucket's gradient (without them, XLA's code reads the concatenate)."""
    _, _, seg = _programs(BENCH)
    hlo = Step(seg).executable.hlo_text()
    if cpu_kernels.available():
        assert "concatenate" not in hlo
        assert "sgdgen_sgd_update_f32" in hlo and "sgdgen_sum_squares_f32" in hlo
    else:
        assert "concatenate" in hlo


# ---- sgdgen.SGD(buckets=True) ----------------------------------------------------------------



def _train(buckets: bool, mesh: Mesh | None = None, steps: int = 8) -> tuple[sgdgen.SGD, list[sgdgen.Variable]]:
    rng = np.random.default_rng(3)
    variables = [sgdgen.Variable(rng.normal(size=s).astype(np.float32), name=v.name, layout=v.layout)
                 for s, v in zip(SHAPES, _specs(mesh or ONE))]
    opt = sgdgen.SGD(0.1, buckets=buckets, mesh=mesh, **ELEMENTWISE)
    for k in range(steps):
        gs = [jax.device_put(rng.normal(size=v.shape).astype(np.float32), v.layout.named_sharding())
              for v in variables]
        opt.apply_gradients(zip(gs, variables))
        if k == 1:
            background.drain()  # started by the second step: the third one takes segments
    return opt, variables


@pytest.mark.parametrize("mesh", [None, "batch=2,model=4"], ids=["one_device", "mesh_2x4"])
def test_sgd_buckets_feeds_per_variable_gradients_as_segments(mesh: str | None) -> None:
    m = Mesh(mesh) if mesh else None
    got_opt, got_vars = _train(True, m)
    want_opt, want_vars = _train(False, m)
    segmented = any(key[0] == "segments" for key in got_opt._flat._programs)
    assert segmented == cpu_kernels.available()  # taken once compiled, wherever the kernels read them
    # the bucket's update is the kernel's (no fused multiply-add); each small variable's own is
    # XLA's, which may fuse them (docs/numerics.md §1): 1e-6 of max|x|, as tests/test_optimizer.py
    for g, w in zip([v.numpy() for v in got_vars] + got_opt.get_weights(),
                    [v.numpy() for v in want_vars] + want_opt.get_weights(), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * max(np.max(np.abs(w)), 1e-30))


def test_a_one_step_process_compiles_no_segmented_program() -> None:
    opt, _ = _train(True, steps=1)
    background.drain()
    assert not opt._flat._programs and not any(k[0] == "segments" for k in opt._flat._programs)


# ---- jax_step(buckets=True) in a jit -----------------------------------------------------------

def test_jax_step_takes_per_leaf_gradients_as_segments_in_a_jit() -> None:
    """Per-leaf gradients under a trace go to the segmented program (the concatenate inside the
    step, read in place on CPU); the results are those of flat gradients, bit for bit."""
    rng = np.random.default_rng(4)
    params = {f"p{i}": jax.numpy.asarray(rng.normal(size=s).astype(np.float32)) for i, s in enumerate(SHAPES)}
    grads = {k: jax.numpy.asarray(rng.normal(size=v.shape).astype(np.float32)) for k, v in params.items()}
    step = sgdgen.jax_step(dict(ELEMENTWISE, learning_rate=0.1), params, buckets=True)
    per_leaf = jax.jit(lambda p, s, g: step(p, g, s))
    flat = step.flatten(params)
    got_p, got_s = per_leaf(flat, step.init(flat), grads)
    want_p, want_s = jax.jit(lambda p, s, g: step(p, g, s))(flat, step.init(flat), step.flatten(grads))
    for got, want in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((want_p, want_s)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    hlo = per_leaf.lower(flat, step.init(flat), grads).compile().as_text()
    assert ("concatenate" not in hlo) == cpu_kernels.available()
    with pytest.raises(StepInputError, match="grad 'p1': shape \\[3\\] does not match the step's \\[64\\]"):
        per_leaf(flat, step.init(flat), {**grads, "p1": jax.numpy.zeros(3)})


def test_a_segmented_step_that_cannot_be_built_falls_back_to_packing(monkeypatch) -> None:
    """The segmented program is an optimisation: if it fails to build, training goes on with the
    gradients packed (one warning), every later step too, with the results of packing."""
    built = []
    real = Step.executable

    def executable(self: Step):
        if self.program.gradient_segments:
            built.append(self.program)
            raise RuntimeError("no such executable")
        return real.fget(self)

    monkeypatch.setattr(Step, "executable", property(executable))
    shapes = SHAPES[:4]
    variables = [sgdgen.Variable(np.full(s, 0.5, np.float32), name=f"v{i}") for i, s in enumerate(shapes)]
    twins = [sgdgen.Variable(np.full(s, 0.5, np.float32), name=f"v{i}") for i, s in enumerate(shapes)]
    opt = sgdgen.SGD(0.1, momentum=0.9, buckets=True)
    want = sgdgen.SGD(0.1, momentum=0.9, buckets=False)
    grads = [jax.numpy.full(s, 0.25, np.float32) for s in shapes]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(5):
            opt.apply_gradients(zip(grads, variables))
            if k == 1:
                background.drain()
            want.apply_gradients(zip(grads, twins))
    failed = [w for w in caught if issubclass(w.category, RuntimeWarning) and "could not be built" in str(w.message)]
    assert len(failed) == 1 and "RuntimeError: no such executable" in str(failed[0].message)
    assert len(built) == 1 and int(opt.iterations.numpy()) == 5
    for v, w in zip(variables, twins):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=0, atol=1e-6)
