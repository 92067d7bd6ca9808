"""Flat buckets (issue 15.2): the plan (sgdgen.frontend.buckets) and `jax_step(buckets=True)`.

A bucketed step runs the same rules on the concatenation of its members, so without norms
it is bit-equal to the unbucketed step (every rule is elementwise). With global_clipnorm
the one difference is the order of the wide (float64) sum of squares: one sum over the
bucket instead of one per member, then their sum. Both are within a few float64 ulps of the
exact sum (relative 1e-15 for these sizes), so the float32 scale differs by at most one
float32 rounding (2**-24 relative) in the rare case the wide values straddle a rounding
boundary; through 10 steps of momentum 0.9 that bounds the parameter difference far below
1e-6 of max|param|, the tolerance used (issue 13's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sgdgen
from sgdgen.errors import ConfigError, StepInputError
from sgdgen.frontend import buckets
from sgdgen.frontend.spec import Layout, Mesh, VarSpec
from sgdgen.integrations.jax import FlatParams

SHAPES = {"a": (3,), "b": (4, 5), "big": (300, 300), "c": (7,), "d": (2, 2, 2), "s": ()}
OPTIONS = [
    dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(learning_rate=0.05, momentum=0.5, clipvalue=0.3, use_ema=True, ema_overwrite_frequency=3),
    dict(learning_rate=0.1, momentum=0.9, global_clipnorm=1.0, use_ema=True, weight_decay=1e-3),
    dict(learning_rate=0.1, momentum=0.0, skip_nonfinite=True),
]


def _specs(mesh: Mesh, shapes=SHAPES, dtype="float32", decay=lambda n: True, layouts=None):
    layouts = layouts or {}
    return [VarSpec(n, s, dtype, Layout(layouts.get(n, [None] * len(s)), mesh), decay(n)) for n, s in shapes.items()]


# ---- the plan ---------------------------------------------------------------------------

def test_small_replicated_variables_share_one_flat_bucket_and_large_ones_keep_their_own():
    p = buckets.plan(_specs(Mesh(())), Mesh(()))
    assert [v.name for v in p.buckets] == ["bucket/float32/0", "big"]
    flat = p.buckets[0]
    assert flat.shape == (3 + 20 + 7 + 8 + 1,) and flat.layout.dims == ((),)
    offsets = [(m.offset, m.size) for m in p.members if not m.own]
    assert offsets == [(0, 3), (3, 20), (23, 7), (30, 8), (38, 1)]  # contiguous, in variable order
    assert p.members[2].own and p.members[2].shape == (300, 300)
    assert p.describe() == "6 variables in 2 buffers (1 flat bucket(s) of 5 variables)"


def test_groups_split_by_dtype_and_weight_decay_and_a_group_of_one_stays_as_it_is():
    mesh = Mesh(())
    specs = _specs(mesh, decay=lambda n: n != "c") + [VarSpec("h", (5,), "bfloat16", Layout([None], mesh))]
    p = buckets.plan(specs, mesh)
    names = [v.name for v in p.buckets]
    assert names == ["bucket/float32/0", "big", "c", "h"]  # "c" (no decay) and "h" (bf16) are groups of one
    assert {p.variables[i].name for i in p.contents[0]} == {"a", "b", "d", "s"}
    assert all(not p.variables[i].name == "c" for i in p.contents[0])


def test_sharded_variables_and_clipnorm_are_not_bucketed():
    mesh = Mesh("batch=2,model=4")
    specs = _specs(mesh, layouts={"b": ["model", None]})
    p = buckets.plan(specs, mesh)
    assert p.members[1].own  # "b" is sharded over model
    assert not p.members[0].own and not p.members[3].own
    assert buckets.plan(specs, mesh, per_variable_norms=True).trivial
    assert buckets.plan(specs, mesh, threshold=1).trivial


def test_bucket_names_never_collide_with_a_variable_name():
    mesh = Mesh(())
    specs = [VarSpec("bucket/float32/0", (2,), "float32", Layout([None], mesh)),
             VarSpec("x", (3,), "float32", Layout([None], mesh))]
    p = buckets.plan(specs, mesh)
    assert p.buckets[0].name == "bucket/float32/0_"


def test_pack_and_unpack_are_inverse():
    p = buckets.plan(_specs(Mesh(())), Mesh(()))
    rng = np.random.default_rng(0)
    values = [rng.normal(size=s).astype(np.float32) for s in SHAPES.values()]
    packed = p.pack(values)
    assert len(packed) == 2 and packed[1] is values[2]  # the large one is passed through, not copied
    for got, want in zip(p.unpack(packed), values):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="6 variables"):
        p.pack(values[:2])


# ---- jax_step(buckets=True) ------------------------------------------------------------

def _params(seed: int = 0, sharding=None):
    rng = np.random.default_rng(seed)
    out = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    return {n: jax.device_put(v, sharding) if sharding is not None else jnp.asarray(v) for n, v in out.items()}


def _train(step, params, steps=10, flat=False, seed=1):
    rng = np.random.default_rng(seed)
    run = jax.jit(step.__call__)
    p = step.flatten(params) if flat else params
    state = step.init(p)
    for _ in range(steps):
        g = {n: jnp.asarray(rng.normal(size=np.shape(v)).astype(np.float32)) for n, v in params.items()}
        p, state = run(p, step.flatten(g) if flat else g, state)
    return (step.unflatten(p) if flat else p), step.per_variable(state)


@pytest.mark.parametrize("options", OPTIONS, ids=range(len(OPTIONS)))
def test_bucketed_step_equals_the_unbucketed_one_over_10_steps(options):
    params = _params()
    exclude = ["c"]
    plain = sgdgen.jax_step(dict(options), params, exclude_from_weight_decay=exclude)
    bucketed = sgdgen.jax_step(dict(options), params, exclude_from_weight_decay=exclude, buckets=True)
    assert len(bucketed.program.variables) == 3  # one flat bucket, "big", and "c" (no decay) alone
    want_p, want_s = _train(plain, params)
    for flat in (True, False):
        got_p, got_s = _train(bucketed, params, flat=flat)
        got = [*got_p.values(), *got_s.momenta, *got_s.averages]
        want = [*want_p.values(), *want_s.momenta, *want_s.averages]
        for g, w in zip(got, want):
            assert g.shape == w.shape
            if "global_clipnorm" in options:
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * float(np.max(np.abs(w))))
            else:
                np.testing.assert_array_equal(g, w)
        assert int(got_s.iterations) == int(want_s.iterations)


def test_bucketed_step_on_a_mesh_with_sharded_leaves_and_weight_update_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "model"))
    params = _params(sharding=NamedSharding(mesh, P()))
    params["big"] = jax.device_put(np.asarray(params["big"]), NamedSharding(mesh, P(None, "model")))
    params["b"] = jax.device_put(np.asarray(params["b"]), NamedSharding(mesh, P("model", None)))
    options = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, use_ema=True)
    plain = sgdgen.jax_step(dict(options), params)
    want_p, want_s = _train(plain, params)
    for zero in (None, "batch"):
        step = sgdgen.jax_step(dict(options, shard_update_over=zero), params, buckets=True)
        assert step.plan.members[1].own  # "b" is sharded over model: its own buffer
        flat = step.flatten(params)
        assert flat.buffers[0].shape == (3 + 7 + 8 + 1,)
        got_p, got_s = _train(step, params, flat=True)
        for g, w in zip([*got_p.values(), *got_s.momenta, *got_s.averages],
                        [*want_p.values(), *want_s.momenta, *want_s.averages]):
            np.testing.assert_array_equal(g, w)
        if zero:  # the flat bucket's momentum is divided over batch like any replicated variable's
            m = step.init(flat).momenta[0]
            assert m.sharding.shard_shape(m.shape)[0] * 2 == m.shape[0]


def test_a_bucketed_step_takes_a_handful_of_arguments():
    params = {f"w{i}": jnp.ones((4, 4)) for i in range(200)}
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9, use_ema=True), params, buckets=True)
    assert len(step.abi.inputs) == 1 + 4 + 1  # iterations, the bucket's w, m, average and gradient, lr
    assert step.program.lowered_text.count("tensor<3200xf32>") >= 4


def test_per_variable_state_round_trips():
    params = _params()
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9, use_ema=True), params, buckets=True)
    _, state = _train(step, params, steps=2, flat=True)  # per_variable already
    back = step.from_per_variable(state)
    assert len(back.momenta) == len(step.program.variables)
    again = step.per_variable(back)
    for x, y in zip([*again.momenta, *again.averages], [*state.momenta, *state.averages]):
        np.testing.assert_array_equal(x, y)


def test_flat_inputs_to_the_wrong_step_are_refused():
    params = _params()
    plain = sgdgen.jax_step(dict(learning_rate=0.1), params)
    bucketed = sgdgen.jax_step(dict(learning_rate=0.1), params, buckets=True)
    flat = bucketed.flatten(params)
    with pytest.raises(StepInputError, match="without buckets"):
        plain(flat, flat, plain.init(params))
    with pytest.raises(ConfigError, match="no buckets"):
        plain.flatten(params)
    with pytest.raises(StepInputError, match="1 buffers"):
        bucketed(FlatParams(flat.buffers[:1]), flat, bucketed.init(flat))
    bad = dict(params, a=jnp.ones((4,)))
    with pytest.raises(StepInputError, match="'a'"):
        bucketed.flatten(bad)


def test_readme_flat_example_runs_as_written():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- jax-flat-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no python block after <!-- jax-flat-example -->"
    scope: dict = {}
    exec(compile(m.group(1), "README.md:jax-flat-example", "exec"), scope)
    step, state, flat = scope["step"], scope["state"], scope["flat"]
    assert len(flat.buffers) == 1 and int(state.iterations) == 3
    assert set(scope["params"]) == {"layer0", "layer1", "layer2"}
    assert float(scope["loss"]) > 0


def test_a_flat_bucket_takes_unreduced_gradients_with_one_reduce_scatter():
    """In explicit-sharding mode, jax.grad with respect to the buckets (reduced over batch) gives
    one unreduced flat gradient per bucket: with ZeRO over batch the step reduce-scatters it
    (one reduce-scatter for the bucket) and the norm takes the one all-reduce; values equal the
    unsharded step with reduced gradients."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2, 4), ("batch", "model"), axis_types=(AxisType.Explicit,) * 2)
    rng = np.random.default_rng(0)
    params = {f"l{i}": jax.device_put(rng.standard_normal((8, 8)).astype(np.float32) * 0.3, NamedSharding(mesh, P()))
              for i in range(3)}
    x = jax.device_put(rng.standard_normal((16, 8)).astype(np.float32), NamedSharding(mesh, P("batch", None)))

    def train(zero):
        step = sgdgen.jax_step(dict(learning_rate=0.05, momentum=0.9, global_clipnorm=1.0, shard_update_over=zero),
                               params, buckets=True)

        def loss(flat):
            h = x
            for w in step.unflatten(flat).values():
                h = jnp.tanh(h @ w)
            return jnp.sum(h ** 2)

        @jax.jit
        def one(flat, state):
            at = jax.tree.map(lambda b: jax.sharding.reshard(b, P(None, reduced={"batch"})), flat) if zero else flat
            return step(flat, jax.grad(loss)(at), state)

        with jax.set_mesh(mesh):
            flat = step.flatten(params)
            state = step.init(flat)
            for _ in range(5):
                flat, state = one(flat, state)
            hlo = one.lower(flat, state).compile().as_text()
        return flat, hlo

    want, _ = train(None)
    got, hlo = train("batch")
    assert hlo.count("reduce-scatter(") + hlo.count("reduce-scatter-start(") == 1
    assert hlo.count("all-reduce(") + hlo.count("all-reduce-start(") == 1  # the global norm's
    for g, w in zip(got.buffers, want.buffers):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * float(np.max(np.abs(w))))
