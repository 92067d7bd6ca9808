"""sgdgen.optax.sgd: the generated step as an optax transformation (chain, MultiSteps, masked).

Tolerance against optax where the rules coincide (momentum + Nesterov + global clip without
decay; decay + clip without momentum): docs/numerics.md §4's float32 bound, 1e-6 * scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgdgen
from sgdgen.errors import StepInputError


def _tree(rng: np.random.Generator) -> dict:
    return {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}


@pytest.mark.parametrize("ours, theirs", [
    (dict(momentum=0.9, nesterov=True, global_clipnorm=1.0),
     lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9, nesterov=True))),
    (dict(weight_decay=1e-2, global_clipnorm=1.0),
     lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-2), optax.sgd(0.1))),
])
def test_matches_optax_where_the_semantics_coincide(ours: dict, theirs) -> None:
    rng = np.random.default_rng(0)
    p = q = _tree(rng)
    tx, ref = sgdgen.optax.sgd(0.1, **ours), theirs()
    s, rs = tx.init(p), ref.init(q)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    for _ in range(6):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 2, jnp.float32), p)
        p, s = step(p, s, g)
        u, rs = ref.update(g, rs, q)
        q = optax.apply_updates(q, u)
        for k in p:
            np.testing.assert_allclose(p[k], q[k], rtol=0, atol=1e-6 * max(1.0, float(jnp.abs(q[k]).max())))
    assert int(s.step.iterations) == 6


def test_apply_updates_gives_the_steps_params_within_one_ulp() -> None:
    rng = np.random.default_rng(1)
    p = _tree(rng)
    tx = sgdgen.optax.sgd(0.1, momentum=0.9)
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9), p)
    s, st = tx.init(p), step.init(p)
    g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), p)
    u, _ = tx.update(g, s, p)
    new, _ = step(p, g, st)
    for k in p:
        got, want, old = np.asarray(optax.apply_updates(p, u)[k]), np.asarray(new[k]), np.asarray(p[k])
        sterbenz = (np.abs(want) >= np.abs(old) / 2) & (np.abs(want) <= 2 * np.abs(old)) & (np.sign(want) == np.sign(old))
        np.testing.assert_array_equal(got[sterbenz], want[sterbenz])
        ulp = np.spacing(np.maximum(np.abs(want), np.abs(old)))
        assert np.all(np.abs(got - want) <= ulp)


def test_chain_multisteps_masked_and_missing_params() -> None:
    rng = np.random.default_rng(2)
    p = _tree(rng)
    g = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, jnp.float32), p)
    chained = optax.chain(optax.scale(0.5), sgdgen.optax.sgd(0.1))
    u, _ = chained.update(g, chained.init(p), p)
    np.testing.assert_allclose(u["w"], -0.05 * np.ones((8, 4)), atol=1e-7)
    ms = optax.MultiSteps(sgdgen.optax.sgd(0.1), every_k_schedule=2)
    st = ms.init(p)
    u, st = jax.jit(ms.update)(g, st, p)
    assert float(jnp.abs(u["w"]).max()) == 0.0  # accumulating
    u, st = jax.jit(ms.update)(g, st, p)
    np.testing.assert_allclose(u["w"], -0.1 * np.ones((8, 4)), atol=1e-6)
    mk = optax.masked(sgdgen.optax.sgd(0.1), {"w": True, "b": False})
    u, _ = mk.update(g, mk.init(p), p)
    np.testing.assert_array_equal(u["b"], g["b"])  # masked out: passed through
    tx = sgdgen.optax.sgd(0.1)
    with pytest.raises(StepInputError, match="needs params"):
        tx.update(g, tx.init(p))
