"""Gradients that arrive unreduced (issue 13): `jax.grad` at a parameter resharded
`reduced={axis}` in explicit-sharding mode gives `{U:axis}` gradients, which the step takes as
they are: summed by its own all_reduce, or, with `shard_update_over=axis`, reduce-scattered.

Every training run is forward + `jax.grad` + the step in ONE user `jax.jit`, 10 steps, compared
with the same training on reduced gradients and no weight-update sharding. Tolerance 1e-6 of
max|ref|: both sum the same per-device f32 partial gradients over the data axis (at most 8), only
the collective's summation order may differ (reduce-scatter vs all-reduce), a relative error of
at most ~8 * 2**-24 ~ 5e-7 per gradient element; each step moves a parameter by lr * |g| (lr 0.05,
the update bounded by the clip or by |g| <~ max|p|), so 10 steps keep the difference far below
1e-6 * max|ref|; without norms and on these sizes it is in fact bit-equal.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import sgdgen
from sgdgen.codegen.abi import StepABI, unreduced_for
from sgdgen.errors import ConfigError, StepInputError
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Layout, Mesh, VarSpec
from sgdgen.runtime import primitive

#: (mesh shape, axis names, data / ZeRO axis, layout of w): the issue's three meshes.
MESHES = [
    ((8,), ("data",), "data", P(None, None)),
    ((2, 4), ("batch", "model"), "batch", P(None, "model")),
    ((2, 2, 2), ("batch", "model", "x"), "batch", P(None, "model")),
]
OPTIONS = [
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.9, global_clipnorm=1.0, use_ema=True),
]
ALL_REDUCE = re.compile(r"\ball-reduce(-start)?\(")
REDUCE_SCATTER = re.compile(r"\breduce-scatter(-start)?\(")


def _loss(p, x):
    # "v" (5x3) has no dimension that divides by 2: its ZeRO slots are padded
    return 1e-2 * jnp.sum((x @ p["w"]) ** 2) + jnp.sum(jnp.tanh(x[:, :5] @ p["v"]))


def _train(shape, names, data, w_spec, options, *, unreduced: bool, zero: bool, steps: int = 10):
    """10 steps of forward + grad + step in one jit; returns (params, compiled HLO text, step)."""
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(rng.normal(size=(8, 16)).astype(np.float32), NamedSharding(mesh, w_spec)),
                  "v": jax.device_put(rng.normal(size=(5, 3)).astype(np.float32), NamedSharding(mesh, P(None, None)))}
        xs = [jax.device_put(rng.normal(size=(8, 8)).astype(np.float32), NamedSharding(mesh, P(data, None)))
              for _ in range(steps)]
        step = sgdgen.jax_step(dict(learning_rate=0.05, shard_update_over=data if zero else None, **options), params)

        def train(p, s, x):
            at = jax.tree.map(lambda w: jax.sharding.reshard(w, P(*jax.typeof(w).sharding.spec, reduced={data})), p) \
                if unreduced else p
            g = jax.grad(_loss)(at, x)
            if unreduced:
                assert all(jax.typeof(t).sharding.spec.unreduced == {data} for t in jax.tree.leaves(g))
            return step(p, g, s)

        f = jax.jit(train, donate_argnums=(0, 1))
        p, s = params, step.init(params)
        hlo = f.lower(p, s, xs[0]).compile().as_text()
        for x in xs:
            p, s = f(p, s, x)
        return {k: np.asarray(v) for k, v in p.items()}, hlo, step


@pytest.mark.parametrize("shape,names,data,w_spec", MESHES, ids=["8", "2x4", "2x2x2"])
@pytest.mark.parametrize("options", OPTIONS, ids=["nesterov-wd", "global_clipnorm-ema"])
def test_zero_with_unreduced_gradients_equals_reduced_unsharded(shape, names, data, w_spec, options):
    want, _, _ = _train(shape, names, data, w_spec, options, unreduced=False, zero=False)
    got, hlo, step = _train(shape, names, data, w_spec, options, unreduced=True, zero=True)
    for n, w in want.items():
        np.testing.assert_allclose(got[n], w, rtol=0, atol=1e-6 * np.max(np.abs(w)))
    # one reduce-scatter per variable, no all-reduce of gradients: only the norm's, if any
    assert len(REDUCE_SCATTER.findall(hlo)) >= 1
    assert len(ALL_REDUCE.findall(hlo)) == (1 if "global_clipnorm" in options else 0)


def test_unreduced_without_zero_is_summed_by_the_step():
    """No weight-update sharding: the variant still takes {U:batch} gradients and sums them."""
    shape, names, data, w_spec = MESHES[1]
    want, _, _ = _train(shape, names, data, w_spec, OPTIONS[1], unreduced=False, zero=False)
    got, hlo, step = _train(shape, names, data, w_spec, OPTIONS[1], unreduced=True, zero=False)
    for n, w in want.items():
        np.testing.assert_allclose(got[n], w, rtol=0, atol=1e-6 * np.max(np.abs(w)))
    assert not REDUCE_SCATTER.findall(hlo) and ALL_REDUCE.findall(hlo)


def test_variant_program_is_cached_and_declares_unreduced():
    mesh = jax.make_mesh((2, 4), ("batch", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(np.ones((8, 16), np.float32), NamedSharding(mesh, P(None, "model")))}
        step = sgdgen.jax_step(dict(learning_rate=0.1, shard_update_over="batch"), params)
        g = jax.ShapeDtypeStruct((8, 16), np.float32, sharding=NamedSharding(mesh, P(None, "model", unreduced={"batch"})))
        seen = []
        jax.jit(lambda g: seen.append(step.program_for([g])) or 0).trace(g)
        jax.jit(lambda g: seen.append(step.program_for([g])) or 0).trace(g)
    assert seen[0] is seen[1] and seen[0] is not step.program
    assert seen[0].unreduced_gradients == (("batch",),)
    assert 'unreduced={"batch"}' in seen[0].stage0_text and "reduce_scatter" in seen[0].lowered_text
    assert step.program_for([np.ones((8, 16), np.float32)]) is step.program  # reduced: the program itself


def test_gradient_unreduced_over_a_sharded_axis_is_refused():
    """The step's parameter is sharded on "batch": a gradient unreduced over it cannot be taken."""
    mesh = jax.make_mesh((2, 4), ("batch", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(np.ones((8, 16), np.float32), NamedSharding(mesh, P(None, "model")))}
        step = sgdgen.jax_step(dict(learning_rate=0.1), params, layouts={"w": P("batch", "model")})
        g = jax.ShapeDtypeStruct((8, 16), np.float32, sharding=NamedSharding(mesh, P(None, "model", unreduced={"batch"})))
        with pytest.raises(StepInputError, match=r"gradient 'w' is unreduced over \['batch'\].*reshard"):
            jax.jit(lambda g: step.program_for([g]) and 0).trace(g)


def test_abi_unreduced_slots_and_refusals():
    mesh = Mesh("batch=2,model=4")
    specs = (VarSpec("w", (8, 16), "float32", Layout([None, "model"], mesh)),
             VarSpec("e", (8, 16), "float32", Layout(["batch", "model"], mesh)))
    per_var = unreduced_for(specs, ("batch",))
    assert per_var == (("batch",), ())  # "e" is sharded on batch: its gradient is reduced
    abi = StepABI.for_config(specs, mesh, SGDConfig.create(0.1), unreduced_gradients=per_var)
    g = abi.inputs[abi.index("gradient", 0)]
    assert g.unreduced == ("batch",) and g.sdy_text() == '#sdy.sharding<@mesh, [{}, {"model"}], unreduced={"batch"}>'
    assert g.to_json()["unreduced"] == ["batch"] and "unreduced" not in abi.inputs[abi.index("gradient", 1)].to_json()
    assert abi.unreduced_gradients == per_var
    assert StepABI.for_config(specs, mesh, SGDConfig.create(0.1)).unreduced_gradients == ()
    with pytest.raises(ConfigError, match=r"gradient of 'e' cannot arrive unreduced over \['batch'\]"):
        StepABI.for_config(specs, mesh, SGDConfig.create(0.1), unreduced_gradients=(("batch",), ("batch",)))
    assert "unreduced" not in str(SGDConfig.create(0.1, shard_update_over="batch").get_config())


def test_placed_refuses_unreduced_outside_explicit_mode():
    mesh = Mesh("batch=2,model=4")
    specs = (VarSpec("w", (8, 16), "float32", Layout([None, "model"], mesh)),)
    abi = StepABI.for_config(specs, mesh, SGDConfig.create(0.1), unreduced_gradients=(("batch",),))
    with pytest.raises(StepInputError, match="unreduced over \\['batch'\\].*explicit-sharding mode"):
        primitive.placed(np.ones((8, 16), np.float32), abi.inputs[abi.index("gradient", 0)])
