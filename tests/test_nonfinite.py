"""skip_nonfinite (docs/numerics.md §2a) and the saturating int64 counters (§2 step 8).

A step whose gradients hold a NaN or an Inf is skipped inside the program: every variable,
momentum and EMA average keeps its bits, `iterations` stays (optax `apply_if_finite`), the
`skipped` counter counts it. The decision is global: a NaN in one shard of a sharded variable
skips the step on every device. Values are compared with `sgdgen.reference` (float32: within
1e-6 of max|ref|, the bound docs/numerics.md §4 gives for a few steps) and skipped steps bit
for bit with the state before them; the default (False) lets NaN/Inf propagate, as tf_keras.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sgdgen
from sgdgen import reference
from sgdgen.codegen.abi import StepABI, StepState
from sgdgen.codegen.generate import generate_text
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Layout, Mesh, VarSpec
from sgdgen.runtime.core import Step
from sgdgen.runtime.program import StepProgram

INT64_MAX = 2 ** 63 - 1
MESHES = {"1": Mesh(()), "2x4": Mesh({"batch": 2, "model": 4})}
#: "1-large": one device, variables large enough for the CPU update kernel (sgd-cpu-update), whose
#: skip must keep every bit too
MESH_KINDS = {"1": "1", "2x4": "2x4", "1-large": "1"}
#: Per config, which steps get which bad value (variable index, element, value); other steps are finite.
BAD = {1: (0, (0, 7), np.nan), 3: (1, (5,), np.inf), 4: (0, (3, 0), -np.inf)}
CONFIGS = {
    "global_clipnorm": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=1.0, use_ema=True,
                            ema_overwrite_frequency=3),
    "clipnorm": dict(momentum=0.9, clipnorm=0.5),
    "no_norm": dict(momentum=0.5),
}


def _specs(mesh: Mesh, large: bool = False) -> tuple[VarSpec, ...]:
    """A kernel sharded over "model" (its element (0, 7) lives on the last model shard only) and a
    bias sharded over "batch"; on one device, both unsharded (`large`: 65,536 elements each)."""
    if not mesh.axes:
        w, b = ((256, 256), (65536,)) if large else ((4, 8), (8,))
        return (VarSpec("w", w, "float32", Layout.replicated(mesh, 2)),
                VarSpec("b", b, "float32", Layout.replicated(mesh, 1), decay=False))
    return (VarSpec("w", (4, 8), "float32", Layout(["unsharded", "model"], mesh)),
            VarSpec("b", (8,), "float32", Layout(["batch"], mesh), decay=False))


def _values(seed: int, specs: tuple[VarSpec, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s.shape).astype(np.float32) for s in specs]


def _grads(k: int, specs: tuple[VarSpec, ...]) -> list[np.ndarray]:
    grads = _values(100 + k, specs)
    if k in BAD:
        var, where, value = BAD[k]
        grads[var][where] = value
    return grads


def _put(x: np.ndarray, spec: VarSpec) -> jax.Array:
    return sgdgen.Variable(x, layout=spec.layout).value


def _host(state: StepState, params: tuple) -> list[np.ndarray]:
    return [np.array(x) for x in (*params, *state.momenta, *state.averages)]


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    scale = max(float(np.max(np.abs(want))), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(np.asarray(got) - want))) <= 1e-6 * scale


@pytest.mark.parametrize("mesh_kind", sorted(MESH_KINDS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_skips_nonfinite_gradients_like_the_reference(mesh_kind: str, name: str) -> None:
    mesh = MESHES[MESH_KINDS[mesh_kind]]
    specs = _specs(mesh, large=mesh_kind == "1-large")
    config = SGDConfig.create(0.1, skip_nonfinite=True, **CONFIGS[name])
    step = Step(StepProgram(config, specs, mesh))
    init = _values(0, specs)
    state = step.init(init)
    params = tuple(_put(v, s) for v, s in zip(init, specs))
    ref = reference.build(config, init)
    mask = [s.decay for s in specs]
    for k in range(6):
        grads = _grads(k, specs)
        before = _host(state, params)
        params, state = step.apply(state, params, [_put(g, s) for g, s in zip(grads, specs)], 0.1)
        ref = reference.apply_gradients(config, ref, grads, decay_mask=mask)
        after = _host(state, params)
        if k in BAD:  # skipped everywhere: every buffer keeps its bits, NaN only in one shard
            assert all(np.array_equal(a, b) for a, b in zip(after, before)), f"step {k} changed the state"
        want = [*ref.variables, *ref.momenta, *(ref.averages or [])]
        assert all(_close(a, w) for a, w in zip(after, want)), f"step {k} differs from the reference"
        assert all(np.all(np.isfinite(a)) for a in after)
        assert int(state.iterations) == ref.iterations == k + 1 - sum(1 for j in BAD if j <= k)
        assert int(state.skipped) == ref.skipped == sum(1 for j in BAD if j <= k)


def test_reference_skip_changes_nothing_but_the_counter() -> None:
    config = SGDConfig.create(0.1, momentum=0.9, use_ema=True, skip_nonfinite=True)
    state = reference.apply_gradients(config, reference.build(config, [np.ones(3, np.float32)]),
                                      [np.full(3, 0.5, np.float32)])
    bad = reference.apply_gradients(config, state, [np.array([0.5, np.nan, 0.5], np.float32)])
    assert (bad.iterations, bad.skipped) == (state.iterations, state.skipped + 1)
    for x, y in zip(bad.variables + bad.momenta + bad.averages, state.variables + state.momenta + state.averages):
        assert np.array_equal(x, y) and x is not y
    plain = SGDConfig.create(0.1)  # the default: values propagate
    out = reference.apply_gradients(plain, reference.build(plain, [np.ones(3, np.float32)]),
                                    [np.array([0.0, np.inf, np.nan], np.float32)])
    assert out.iterations == 1 and out.skipped == 0 and np.isnan(out.variables[0][2])
    assert reference.increment(INT64_MAX) == INT64_MAX and reference.increment(INT64_MAX - 1) == INT64_MAX


def test_sgd_counts_skipped_steps_and_default_propagates() -> None:
    mesh = MESHES["2x4"]
    layout = Layout(["unsharded", "model"], mesh)
    good, bad = np.full((4, 8), 0.25, np.float32), np.full((4, 8), 0.25, np.float32)
    bad[2, 1] = np.nan
    v = sgdgen.Variable(np.ones((4, 8), np.float32), name="w", layout=layout)
    opt = sgdgen.SGD(0.1, momentum=0.9, skip_nonfinite=True)
    opt.apply_gradients([(good, v)])
    kept = v.numpy()
    opt.apply_gradients([(bad, v)])
    assert np.array_equal(v.numpy(), kept)
    assert int(opt.iterations.numpy()) == 1 and int(opt.skipped_steps.numpy()) == 1
    assert opt.skipped_steps.layout.sharding_specs == opt.iterations.layout.sharding_specs
    opt.apply_gradients([(good, v)])
    assert int(opt.iterations.numpy()) == 2 and int(opt.skipped_steps.numpy()) == 1

    w = sgdgen.Variable(np.ones((4, 8), np.float32), name="w", layout=layout)
    default = sgdgen.SGD(0.1)
    default.apply_gradients([(bad, w)])
    assert np.isnan(w.numpy()[2, 1]) and int(default.iterations.numpy()) == 1
    assert int(default.skipped_steps.numpy()) == 0


def test_jax_step_skips_inside_jit() -> None:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "model"))
    params = {"w": jax.device_put(np.ones((4, 8), np.float32), NamedSharding(mesh, P(None, "model")))}
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9, global_clipnorm=1.0, skip_nonfinite=True), params)
    train = jax.jit(lambda p, g, s: step(p, g, s))
    state = step.init(params)
    good = {"w": jnp.full((4, 8), 0.5, jnp.float32)}
    bad = {"w": good["w"].at[0, 7].set(jnp.inf)}
    p1, s1 = train(params, good, state)
    p2, s2 = train(p1, bad, s1)
    assert np.array_equal(np.asarray(p2["w"]), np.asarray(p1["w"]))
    assert np.array_equal(np.asarray(s2.momenta[0]), np.asarray(s1.momenta[0]))
    assert (int(s2.iterations), int(s2.skipped)) == (1, 1)
    config = SGDConfig.create(0.1, momentum=0.9, global_clipnorm=1.0, skip_nonfinite=True)
    ref = reference.apply_gradients(config, reference.build(config, [np.ones((4, 8), np.float32)]),
                                    [np.asarray(good["w"])])
    assert _close(np.asarray(p1["w"]), ref.variables[0])


@pytest.mark.parametrize("skip", [False, True])
def test_counter_saturates_at_int64_max_and_schedule_stays_finite(skip: bool) -> None:
    mesh = MESHES["1"]
    specs = _specs(mesh)
    schedule = sgdgen.schedules.CosineDecay(0.1, decay_steps=1000, alpha=0.1)
    config = SGDConfig.create(schedule, momentum=0.9, skip_nonfinite=skip)
    step = Step(StepProgram(config, specs, mesh))
    init = _values(1, specs)
    state = step.init(init, iterations=INT64_MAX)
    params = tuple(_put(v, s) for v, s in zip(init, specs))
    grads = _values(2, specs)
    params, state = step.apply(state, params, [_put(g, s) for g, s in zip(grads, specs)])
    assert int(state.iterations) == INT64_MAX
    ref = reference.apply_gradients(config, reference.RefState(INT64_MAX, init, [np.zeros_like(x) for x in init],
                                                                None), grads)
    assert ref.iterations == INT64_MAX
    for got, want in zip(params, ref.variables):
        assert np.all(np.isfinite(np.asarray(got))) and _close(np.asarray(got), want)


def test_skipped_counter_saturates() -> None:
    mesh = MESHES["1"]
    specs = _specs(mesh)
    config = SGDConfig.create(0.1, skip_nonfinite=True)
    step = Step(StepProgram(config, specs, mesh))
    init = _values(3, specs)
    state = step.init(init)
    state = state._replace(skipped=sgdgen.Variable(np.int64(INT64_MAX), layout=Layout.replicated(mesh, 0),
                                                   dtype=np.int64).value)
    params = tuple(_put(v, s) for v, s in zip(init, specs))
    _, state = step.apply(state, params, [_put(g, s) for g, s in zip(_grads(1, specs), specs)], 0.1)
    assert int(state.skipped) == INT64_MAX and int(state.iterations) == 0


def test_config_option_is_keyword_only_and_reported_only_when_set() -> None:
    assert "skip_nonfinite" not in SGDConfig.create(0.1).get_config()
    config = SGDConfig.create(0.1, skip_nonfinite=True)
    assert config.get_config()["skip_nonfinite"] is True
    assert SGDConfig.from_config(config.get_config()) == config
    assert sgdgen.SGD(0.1, skip_nonfinite=True).get_config()["skip_nonfinite"] is True
    with pytest.raises(TypeError, match="skip_nonfinite"):
        SGDConfig.create(0.1, skip_nonfinite="yes")
    with pytest.raises(TypeError):
        SGDConfig.create(0.1, 0.0, False, False, None, None, False, "SGD", True)  # no positional slot for it


def test_abi_adds_the_counter_only_with_the_option() -> None:
    mesh = MESHES["2x4"]
    specs = _specs(mesh)
    plain = StepABI.for_config(specs, mesh, SGDConfig.create(0.1))
    skip = StepABI.for_config(specs, mesh, SGDConfig.create(0.1, skip_nonfinite=True))
    assert "skipped" not in [s.role for s in plain.inputs] and not plain.skip_nonfinite
    assert [s.role for s in skip.outputs][-1] == "skipped" and skip.donated == tuple(range(len(skip.outputs)))
    assert len(skip.outputs) == len(plain.outputs) + 1
    args = skip.pack(StepState("it", ("m0", "m1"), (), "sk"), ["w", "b"], ["g0", "g1"], "lr")
    assert args == ["it", "w", "b", "m0", "m1", "sk", "g0", "g1", "lr"]
    assert skip.unpack(args[:6]) == (("w", "b"), StepState("it", ("m0", "m1"), (), "sk"))
    with pytest.raises(ValueError, match="state.skipped is None"):
        skip.pack(StepState("it", ("m0", "m1")), ["w", "b"], ["g0", "g1"], "lr")
    with pytest.raises(ValueError, match="no skipped-step counter"):
        plain.pack(StepState("it", ("m0", "m1"), (), "sk"), ["w", "b"], ["g0", "g1"], "lr")
    text = generate_text(SGDConfig.create(0.1, momentum=0.9, global_clipnorm=1.0), specs, mesh)
    assert "nonfinite" not in text and "stablehlo.select" not in text
