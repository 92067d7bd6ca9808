"""The generated step inside a user's jax.jit (sgdgen.jax_step, the sgdgen_step primitive).

One XLA program for forward + backward + step; values equal to `SGD.apply_gradients` (bit
for bit: the same module, the same devices) and to `sgdgen.reference` for every option; the
learning rate a runtime input; in-place update through the user's donation, checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sgdgen
from sgdgen import reference
from sgdgen.codegen.abi import StepState
from sgdgen import SpecError
from sgdgen.errors import ConfigError, StepInputError, StepTypeError
from sgdgen.runtime import primitive

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=1.0)


def _mesh(kind: str) -> jax.sharding.Mesh:
    if kind == "1":
        return jax.sharding.Mesh(np.array(jax.devices()[0]), ())
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "model"))


def _params(kind: str, seed: int = 0) -> dict[str, jax.Array]:
    """A two-layer model: a kernel sharded over "model" and a replicated bias on the 2x4 mesh."""
    mesh = _mesh(kind)
    rng = np.random.default_rng(seed)
    kernel_spec = P() if kind == "1" else P(None, "model")
    return {"dense": {"kernel": jax.device_put(rng.standard_normal((8, 4), np.float32), NamedSharding(mesh, kernel_spec)),
                      "bias": jax.device_put(rng.standard_normal(4).astype(np.float32), NamedSharding(mesh, P()))}}


def _loss(params, x, y):
    pred = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((pred - y) ** 2)


def _batch(kind: str, seed: int = 1):
    rng = np.random.default_rng(seed)
    mesh = _mesh(kind)
    batch = NamedSharding(mesh, P() if kind == "1" else P("batch"))
    return (jax.device_put(rng.standard_normal((6 if kind == "1" else 4, 8), np.float32), batch),
            jax.device_put(rng.standard_normal((6 if kind == "1" else 4, 4), np.float32), batch))


def _train_step(step):
    def train(params, state, x, y, lr):
        grads = jax.grad(_loss)(params, x, y)
        new_params, new_state = step(params, grads, state, lr)
        return new_params, new_state, grads
    return train


@pytest.mark.parametrize("kind", ["1", "2x4"])
def test_fused_train_step_is_one_program_equal_to_apply_gradients(kind: str) -> None:
    params = _params(kind)
    step = sgdgen.jax_step(OPTIONS, params, exclude_from_weight_decay=["bias"])
    train = jax.jit(_train_step(step), donate_argnums=(0, 1))
    x, y = _batch(kind)
    state = step.init(params)
    compiled = train.lower(params, state, x, y, 0.1).compile()
    text = compiled.as_text()
    assert text.count("HloModule") == 1
    if kind == "2x4":  # the user's gradient reduction and the step's norm reduction, in one program
        assert len(re.findall(r"all-reduce\(", text)) >= 1
    assert sgdgen.check_in_place(compiled, params_argnums=(0,)) == []

    opt = sgdgen.SGD(**OPTIONS, mesh=_mesh(kind))
    names = ("dense/bias", "dense/kernel")
    variables = [sgdgen.Variable(np.asarray(params["dense"][n.split("/")[1]]), name=n,
                                 layout=v.layout) for n, v in zip(names, step.program.variables)]
    opt.exclude_from_weight_decay(var_names=["bias"])
    for k in range(3):
        params, state, grads = train(params, state, x, y, 0.1)
        opt.apply_gradients(zip(jax.tree_util.tree_leaves(grads), variables))
    for got, want in zip(jax.tree_util.tree_leaves(params), variables):
        np.testing.assert_array_equal(np.asarray(got), want.numpy())
    for got, want in zip(state.momenta, opt._momenta):
        np.testing.assert_array_equal(np.asarray(got), want.numpy())
    assert int(state.iterations) == 3 == int(opt.iterations.numpy())
    assert params["dense"]["kernel"].sharding.is_equivalent_to(variables[1].layout.named_sharding(), 2)


CASES = {
    "plain": dict(learning_rate=0.05),
    "momentum": dict(learning_rate=0.05, momentum=0.9),
    "nesterov": dict(learning_rate=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(learning_rate=0.05, momentum=0.5, weight_decay=0.1),
    "clipnorm": dict(learning_rate=0.05, clipnorm=0.5),
    "clipvalue": dict(learning_rate=0.05, clipvalue=0.1),
    "global_clipnorm": dict(learning_rate=0.05, momentum=0.9, global_clipnorm=0.5),
    "ema_overwrite": dict(learning_rate=0.05, momentum=0.9, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=2),
    "schedule": dict(learning_rate=sgdgen.schedules.ExponentialDecay(0.1, 2, 0.5), momentum=0.9),
}


@pytest.mark.parametrize("kind", ["1", "2x4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_option_matches_the_reference(case: str, kind: str) -> None:
    """float32 within 1e-6 of max|ref| per slot over 4 steps (SEMANTICS decision 10: per-op float32
    rounding, the norms summed wide in the reference; the same bound test_core uses)."""
    kwargs = CASES[case]
    params = _params(kind, seed=3)
    step = sgdgen.jax_step(kwargs, params, exclude_from_weight_decay=["bias"])
    config = step.program.config
    leaves = [np.asarray(p) for p in jax.tree_util.tree_leaves(params)]
    rng = np.random.default_rng(7)
    grads_seq = [[rng.standard_normal(v.shape).astype(np.float32) for v in leaves] for _ in range(4)]
    run = jax.jit(lambda p, g, s: step(p, g, s))
    state = step.init(params)
    treedef = jax.tree_util.tree_structure(params)
    for grads in grads_seq:
        g = jax.tree_util.tree_unflatten(treedef, [jax.device_put(x, leaf.sharding) for x, leaf in
                                                   zip(grads, jax.tree_util.tree_leaves(params))])
        params, state = run(params, g, state)
    expect = reference.run(config, leaves, grads_seq, decay_mask=[v.decay for v in step.program.variables])
    pairs = [*zip(jax.tree_util.tree_leaves(params), expect.variables), *zip(state.momenta, expect.momenta)]
    if config.use_ema:
        pairs += list(zip(state.averages, expect.averages))
    for got, want in pairs:
        scale = float(np.max(np.abs(want)))
        assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-6 * scale
    assert int(state.iterations) == expect.iterations == 4
    assert [v.decay for v in step.program.variables] == [False, True]  # "dense/bias" excluded


def test_changing_the_learning_rate_does_not_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's jit lowers (and so compiles) the step once for every float rate: each lowering
    of the primitive asks `module_text` for the module, so counting those calls counts compiles."""
    params = _params("2x4")
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9), params)
    lowerings = []
    real = primitive.module_text
    monkeypatch.setattr(primitive, "module_text", lambda program: lowerings.append(program) or real(program))
    train = jax.jit(_train_step(step))
    x, y = _batch("2x4")
    state = step.init(params)
    results = [train(params, state, x, y, lr)[0] for lr in (0.1, 0.05, 0.01, 0.3)]
    assert len(lowerings) == 1, "one compile for four learning rates"
    kernels = [np.asarray(r["dense"]["kernel"]) for r in results]
    assert all(not np.array_equal(a, b) for a, b in zip(kernels, kernels[1:])), "each rate is used"
    same = train(params, state, x, y, 0.0)[0]  # a zero rate leaves the parameters unchanged
    np.testing.assert_array_equal(np.asarray(same["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]))
    assert len(lowerings) == 1


def test_check_in_place_finds_a_missing_donation() -> None:
    params = _params("2x4")
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9), params)
    state = step.init(params)
    x, y = _batch("2x4")
    undonated = jax.jit(_train_step(step)).lower(params, state, x, y, 0.1).compile()
    assert sgdgen.check_in_place(undonated, params_argnums=(0,)) == [
        "args[0]['dense']['bias']", "args[0]['dense']['kernel']", "args[1].iterations", "args[1].momenta[0]",
        "args[1].momenta[1]"]
    only_state = jax.jit(_train_step(step), donate_argnums=(1,)).lower(params, state, x, y, 0.1).compile()
    assert sgdgen.check_in_place(only_state, params_argnums=(0,)) == [
        "args[0]['dense']['bias']", "args[0]['dense']['kernel']"]
    assert sgdgen.check_in_place(only_state) == []  # the StepState alone is in place
    with pytest.raises(StepInputError, match="params_argnums"):
        sgdgen.check_in_place(jax.jit(lambda a: a + 1).lower(x).compile())


def test_an_unused_argument_before_the_state_does_not_shift_the_check() -> None:
    params = _params("1")
    step = sgdgen.jax_step(dict(learning_rate=0.1), params)
    state = step.init(params)

    def f(unused, params, state, grads):
        return step(params, grads, state)

    compiled = jax.jit(f, donate_argnums=(1, 2)).lower(jnp.ones(3), params, state, params).compile()
    assert sgdgen.check_in_place(compiled, params_argnums=(1,)) == []


def test_eager_call_leaves_its_inputs_alive_and_matches_jit() -> None:
    params = _params("2x4")
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9), params)
    state = step.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 0.5, params)
    eager_params, eager_state = step(params, grads, state, 0.1)
    jit_params, jit_state = jax.jit(step.__call__)(params, grads, state, 0.1)
    assert not any(a.is_deleted() for a in jax.tree_util.tree_leaves((params, state)))
    for a, b in zip(jax.tree_util.tree_leaves((eager_params, eager_state)), jax.tree_util.tree_leaves((jit_params, jit_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_iterations_keep_the_callers_width() -> None:
    params = _params("1")
    step = sgdgen.jax_step(dict(learning_rate=0.1), params)
    state = step.init(params, iterations=5)
    assert state.iterations.dtype == jnp.int32  # JAX without x64
    _, new = jax.jit(step.__call__)(params, params, state)
    assert new.iterations.dtype == jnp.int32 and int(new.iterations) == 6
    with jax.enable_x64(True):
        state64 = step.init(params, iterations=2**40)
        _, new64 = jax.jit(step.__call__)(params, params, state64)
        assert new64.iterations.dtype == jnp.int64 and int(new64.iterations) == 2**40 + 1


def test_inputs_laid_out_otherwise_are_resharded_to_the_steps_layouts() -> None:
    mesh = _mesh("2x4")
    params = _params("2x4")
    layouts = {"dense": {"kernel": P("batch", "model"), "bias": P("model")}}
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9), params, layouts=layouts)
    state = step.init(params)
    assert state.momenta[1].sharding.spec == P("batch", "model")
    new_params, new_state = jax.jit(step.__call__)(params, params, state)
    assert new_params["dense"]["kernel"].sharding.is_equivalent_to(NamedSharding(mesh, P("batch", "model")), 2)
    want = np.asarray(params["dense"]["kernel"]) * (1 - 0.1)
    np.testing.assert_allclose(np.asarray(new_params["dense"]["kernel"]), want, rtol=1e-6)


def test_explicit_sharding_mode() -> None:
    mesh = jax.make_mesh((2, 4), ("batch", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    kernel = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P(None, "model")))
    params = {"kernel": kernel}
    step = sgdgen.jax_step(dict(learning_rate=0.5, momentum=0.9), params)
    state = step.init(params)
    with jax.set_mesh(mesh):
        new_params, new_state = jax.jit(step.__call__)(params, params, state)
        typed = jax.typeof(new_params["kernel"])
    assert typed.sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(new_params["kernel"]), np.full((8, 4), 0.5, np.float32))


def test_shardy_disabled_is_refused_with_a_clear_message() -> None:
    params = _params("1")
    step = sgdgen.jax_step(dict(learning_rate=0.1), params)
    state = step.init(params)
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        with pytest.raises(ConfigError, match="jax_use_shardy_partitioner"):
            jax.jit(step.__call__)(params, params, state)
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)
    assert primitive.SHARDY_REQUIRED.startswith("sgdgen's step is a Shardy module")


def test_wrong_inputs_name_the_leaf() -> None:
    params = _params("1")
    step = sgdgen.jax_step(dict(learning_rate=0.1), params)
    state = step.init(params)
    with pytest.raises(StepInputError, match="structure"):
        step(params, {"dense": {"kernel": params["dense"]["kernel"]}}, state)
    bad = {"dense": {"kernel": params["dense"]["kernel"].astype(jnp.bfloat16), "bias": params["dense"]["bias"]}}
    with pytest.raises(StepTypeError, match=r"gradient 'gradient/dense/kernel'.*astype"):
        step(params, bad, state)
    with pytest.raises(ConfigError, match="schedule"):
        sgdgen.jax_step(dict(learning_rate=sgdgen.schedules.ExponentialDecay(0.1, 2, 0.5)), params)(
            params, params, state, 0.1)
    with pytest.raises(SpecError, match="unsharded|mesh axis"):
        sgdgen.jax_step(dict(learning_rate=0.1), params, layouts={"dense": {"kernel": P("nope"), "bias": None}})


def test_arguments_committed_to_other_devices_are_refused_naming_the_leaf() -> None:
    """Layouts differ -> resharded (test above); devices differ -> jit's own error, naming the leaf."""
    params = _params("2x4")
    step = sgdgen.jax_step(dict(learning_rate=0.1), params)
    one = jax.devices()[0]
    local = jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a), one), params)
    state = StepState(jnp.int32(0), tuple(jnp.zeros(a.shape) for a in jax.tree_util.tree_leaves(local)))
    with pytest.raises(ValueError, match=r"incompatible devices.*params\['dense'\]\['bias'\]"):
        jax.jit(step.__call__)(local, local, state)


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no python block after <!-- {marker} -->"
    return m.group(1)


def test_readme_jit_example_runs_as_written() -> None:
    namespace: dict = {}
    exec(compile(_readme_block("jax-jit-example"), "README.md:jax-jit-example", "exec"), namespace)
    assert namespace["problems"] == []
    assert int(namespace["state"].iterations) == 3
