"""The functional core (sgdgen.runtime.core.Step) and the one calling convention (StepABI.pack/unpack).

`sgdgen.SGD` is a shell over `Step.apply`; these tests drive the core directly and check it is
the same program: bit-equal to `SGD.apply_gradients` fed the same gradients, and to the NumPy
reference within the float32 tolerance of docs/numerics.md.
"""

from __future__ import annotations

import numpy as np
import pytest

import sgdgen
from sgdgen import reference
from sgdgen.codegen.abi import StepABI, StepState
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Layout, Mesh, VarSpec
from sgdgen.runtime.cache import ExecutableCache
from sgdgen.runtime.core import Step
from sgdgen.runtime.program import StepProgram

MESH = Mesh({"batch": 2, "model": 4})
SPECS = (VarSpec("w", (4, 8), "float32", Layout(["unsharded", "model"], MESH)),
         VarSpec("b", (8,), "float32", Layout(["batch"], MESH), decay=False))
CONFIG = SGDConfig.create(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=1.0,
                          use_ema=True, ema_overwrite_frequency=3)


def _values(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s.shape).astype(np.float32) for s in SPECS]


def test_pack_and_unpack_are_inverse_and_follow_the_abi() -> None:
    abi = StepABI.for_config(SPECS, MESH, CONFIG)
    state = StepState("it", ("m0", "m1"), ("a0", "a1"))
    args = abi.pack(state, ["w", "b"], ["g0", "g1"], "lr")
    assert [s.role for s in abi.inputs] == ["iterations", "variable", "variable", "momentum", "momentum",
                                           "average", "average", "gradient", "gradient", "learning_rate"]
    assert args == ["it", "w", "b", "m0", "m1", "a0", "a1", "g0", "g1", "lr"]
    assert abi.donated == tuple(range(7))
    params, new = abi.unpack(args[:7])
    assert params == ("w", "b") and new == state


@pytest.mark.parametrize("bad,message", [
    (dict(grads=["g0"]), "2 variables, but 1 gradients"),
    (dict(lr=None), "takes the learning rate"),
    (dict(state=StepState("it", ("m0",), ("a0", "a1"))), "1 momenta"),
])
def test_pack_refuses_what_does_not_fit(bad: dict, message: str) -> None:
    abi = StepABI.for_config(SPECS, MESH, CONFIG)
    kw = dict(state=StepState("it", ("m0", "m1"), ("a0", "a1")), params=["w", "b"], grads=["g0", "g1"], lr="lr")
    kw.update(bad)
    with pytest.raises(ValueError, match=message):
        abi.pack(**kw)


def test_schedule_step_takes_no_learning_rate() -> None:
    config = SGDConfig.create(sgdgen.schedules.ExponentialDecay(0.1, 4, 0.5))
    abi = StepABI.for_config(SPECS, MESH, config)
    assert not abi.lr_input and not abi.use_ema
    with pytest.raises(ValueError, match="schedule"):
        abi.pack(StepState("it", ("m0", "m1")), ["w", "b"], ["g0", "g1"], 0.1)


def test_functional_step_is_bit_equal_to_sgd_apply_gradients(tmp_path) -> None:
    step = Step(StepProgram(CONFIG, SPECS, MESH), cache=ExecutableCache(tmp_path))
    init = _values(0)
    state = step.init(init)
    params = [sgdgen.Variable(v, layout=s.layout, name=s.name) for v, s in zip(init, SPECS)]
    arrays = [sgdgen.Variable(v, layout=s.layout).value for v, s in zip(init, SPECS)]
    opt = sgdgen.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=1.0, use_ema=True,
                     ema_overwrite_frequency=3, mesh=MESH)
    opt.exclude_from_weight_decay(var_names=["b"])
    for k in range(5):
        grads = _values(10 + k)
        arrays, state = step.apply(state, arrays, [
            sgdgen.Variable(g, layout=s.layout).value for g, s in zip(grads, SPECS)], 0.1)
        opt.apply_gradients(zip(grads, params))
    for got, want in zip(arrays, params):
        np.testing.assert_array_equal(np.asarray(got), want.numpy())
    assert int(np.asarray(state.iterations)) == 5 == int(opt.iterations.numpy())
    for m, slot in zip(state.momenta, opt._momenta):
        np.testing.assert_array_equal(np.asarray(m), slot.numpy())


def test_functional_step_matches_the_reference() -> None:
    """float32 within 1e-6 of max|ref| over 4 steps (docs/numerics.md: per-op rounding in float32,
    the norm summed wide; every option on)."""
    step = Step(StepProgram(CONFIG, SPECS, MESH))
    init = _values(1)
    state = step.init(init)
    arrays = [sgdgen.Variable(v, layout=s.layout).value for v, s in zip(init, SPECS)]
    grads_seq = [_values(20 + k) for k in range(4)]
    for grads in grads_seq:
        arrays, state = step.apply(state, arrays, [sgdgen.Variable(g, layout=s.layout).value
                                                   for g, s in zip(grads, SPECS)], 0.1)
    expect = reference.run(CONFIG, init, grads_seq, decay_mask=[s.decay for s in SPECS])
    for got, want in [*zip(arrays, expect.variables), *zip(state.momenta, expect.momenta),
                      *zip(state.averages, expect.averages)]:
        scale = float(np.max(np.abs(want)))
        assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-6 * scale
    assert int(np.asarray(state.iterations)) == expect.iterations == 4


def test_donated_inputs_are_consumed_and_gradients_are_not() -> None:
    step = Step(StepProgram(CONFIG, SPECS, MESH))
    init = _values(2)
    state = step.init(init)
    arrays = [sgdgen.Variable(v, layout=s.layout).value for v, s in zip(init, SPECS)]
    grads = [sgdgen.Variable(g, layout=s.layout).value for g, s in zip(_values(3), SPECS)]
    new_arrays, new_state = step.apply(state, arrays, grads, 0.1)
    assert all(a.is_deleted() for a in arrays) and state.iterations.is_deleted()
    assert not any(g.is_deleted() for g in grads)
    with pytest.raises(ValueError, match="donated to an earlier step"):
        step.apply(state, arrays, grads, 0.1)
    assert not any(a.is_deleted() for a in new_arrays)  # a refused call changes nothing


def test_cache_is_bounded_and_counts() -> None:
    cache = ExecutableCache(None, max_entries=1)
    a = StepProgram(CONFIG, SPECS, MESH)
    b = StepProgram(SGDConfig.create(0.1), SPECS, MESH)
    cache.get(a)
    cache.get(a)
    cache.get(b)
    assert len(cache) == 1 and cache.stats.compiles == 2 and cache.stats.memory_hits == 1
    cache.get(a)
    assert cache.stats.compiles == 3, "the least recently used program was evicted"
    with pytest.raises(ValueError, match="max_entries"):
        ExecutableCache(None, max_entries=0)


def test_unusable_cache_directory_warns_once_and_steps(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ExecutableCache(blocker / "cache")
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        cache.get(StepProgram(SGDConfig.create(0.1), SPECS, MESH))
    assert cache.directory is None and cache.stats.compiles == 1


def test_float_learning_rate_shares_one_program() -> None:
    a = StepProgram(SGDConfig.create(0.1, momentum=0.9), SPECS, MESH)
    b = StepProgram(SGDConfig.create(0.2, momentum=0.9), SPECS, MESH)
    assert a.signature == b.signature and a.lowered_text == b.lowered_text


def test_each_argument_is_checked_once_per_step() -> None:
    """The step's own results fed back, the learning-rate array it was given before and the
    gradients `SGD` has checked are not checked again by the executable (issue 14: one check
    per input per step); a gradient nobody checked is."""
    variables = [sgdgen.Variable(np.ones(s.shape, np.float32), layout=s.layout, name=s.name) for s in SPECS]
    opt = sgdgen.SGD(0.1, momentum=0.9, use_ema=True, mesh=MESH)
    grads = lambda: [sgdgen.Variable(np.full(s.shape, 0.5, np.float32), layout=s.layout).value for s in SPECS]
    opt.apply_gradients(zip(grads(), variables))
    (step,) = opt._steps.values()
    exe = step.executable
    asked: list[int] = []
    real = exe.equivalent
    exe.equivalent = lambda have, want, ndim: asked.append(ndim) or real(have, want, ndim)
    try:
        opt.apply_gradients(zip(grads(), variables))
        assert asked == [], "a fed-back state, a known learning rate or a checked gradient was checked again"
        state = StepState(opt.iterations.value, tuple(m.value for m in opt._momenta),
                          tuple(a.value for a in opt._averages))
        new, state = step.apply(state, [v.value for v in variables], grads(), 0.1)  # gradients nobody checked
        assert len(asked) == len(SPECS)
        bad = [np.ones((3, 3), np.float32), grads()[1]]
        with pytest.raises(ValueError, match="shape"):  # and a wrong one is still caught, before anything runs
            step.apply(state, list(new), bad, 0.1)
        assert not any(a.is_deleted() for a in new)
    finally:
        exe.equivalent = real


def test_a_donated_array_passed_twice_is_refused_before_anything_runs() -> None:
    """Every donated argument must be its own buffer: the same array at two state positions is
    refused, naming both, whether both are new to the executable or one is its own result of
    the last call fed back to its position (which skips the per-argument checks); a step's
    results fed back swapped between two positions of one shape are distinct arrays and run."""
    specs = (VarSpec("a", (8,), "float32", Layout.replicated(MESH, 1)),
             VarSpec("b", (8,), "float32", Layout.replicated(MESH, 1)))
    step = Step(StepProgram(SGDConfig.create(0.1, momentum=0.9), specs, MESH))
    grads = [sgdgen.Variable(np.full(8, 0.5, np.float32), layout=s.layout).value for s in specs]
    fresh = lambda: sgdgen.Variable(np.ones(8, np.float32), layout=specs[0].layout).value  # noqa: E731
    same = fresh()
    state = step.init([np.ones(8, np.float32)] * 2)
    with pytest.raises(ValueError, match="variable 'b': the same array is also passed as variable 'a'"):
        step.apply(state, [same, same], grads, 0.1)
    assert not same.is_deleted() and not state.iterations.is_deleted()
    params, state = step.apply(state, [fresh(), fresh()], grads, 0.1)
    # the last call's result for 'a' fed back to 'a' (trusted) and passed again as a momentum
    with pytest.raises(ValueError, match="the same array is also passed as variable 'a'"):
        step.apply(state._replace(momenta=(params[0], state.momenta[1])), list(params), grads, 0.1)
    assert not params[0].is_deleted()
    params, state = step.apply(state, [params[1], params[0]], grads, 0.1)  # swapped: distinct, so it runs
    assert int(np.asarray(state.iterations)) == 2


@pytest.mark.parametrize("buckets", [False, True])
def test_one_device_gradient_sharing_a_donated_buffer_is_copied(buckets: bool) -> None:
    """On one device a checked gradient's buffer address is asked directly (not remembered):
    a gradient that is a second jax.Array over a variable's own buffer (rebuilt from its shard)
    still runs on a copy, and the step equals the same step fed a fresh gradient of equal value."""
    import jax

    def make() -> tuple[sgdgen.SGD, list[sgdgen.Variable]]:
        vs = [sgdgen.Variable(np.full((512, 512), 0.5, np.float32), name="big"),  # its own buffer in buckets too
              sgdgen.Variable(np.full(8, 0.25, np.float32), name="small")]
        return sgdgen.SGD(0.1, momentum=0.9, buckets=buckets), vs

    opt, vs = make()
    ref, rvs = make()
    for _ in range(3):
        assert vs[0]._view is None  # the variable's own buffer, donated to the step
        w = vs[0].value
        alias = jax.make_array_from_single_device_arrays(w.shape, w.sharding, [s.data for s in w.addressable_shards])
        small = jax.numpy.full(8, 0.125, np.float32)
        assert alias is not w and alias.unsafe_buffer_pointer() == w.unsafe_buffer_pointer()
        host = np.array(alias)
        opt.apply_gradients([(alias, vs[0]), (small, vs[1])])
        ref.apply_gradients([(jax.numpy.asarray(host), rvs[0]), (small, rvs[1])])
    for a, b in zip(vs, rvs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
