"""The per-step path of `sgdgen.SGD.apply_gradients` for a training loop (issue 15.3).

A call with the last call's variables and gradients like its own (type, shape, dtype,
sharding) reuses that call's resolution (`sgdgen.api.sgd._RepeatedCall`) and skips the
per-variable checks. These tests pin that it is taken when it should be, that anything
different takes the full path (whose errors change nothing), and that both paths give
bit-identical states (one compiled program: tolerance zero).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import sgdgen
from sgdgen.api.sgd import SGD

SHAPES = [(6, 5), (7,), (3, 4), (2,)]
CONFIG = dict(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, global_clipnorm=1.0,
              use_ema=True, ema_overwrite_frequency=3)


def _variables() -> list[sgdgen.Variable]:
    rng = np.random.default_rng(0)
    return [sgdgen.Variable(rng.standard_normal(s).astype(np.float32), name=f"v{i}") for i, s in enumerate(SHAPES)]


def _grads(seed: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jax.device_put(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _full_checks(opt: SGD, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that took the full path (each checks every gradient once)."""
    calls = [0]
    original = SGD._place_gradient

    def counted(self: SGD, g: object, v: sgdgen.Variable) -> object:
        calls[0] += 1
        return original(self, g, v)
    monkeypatch.setattr(SGD, "_place_gradient", counted)
    return calls


def _state(opt: SGD, vs: list[sgdgen.Variable]) -> list[np.ndarray]:
    return [v.numpy() for v in vs] + [np.asarray(w) for w in opt.get_weights()]


@pytest.mark.parametrize("buckets", [False, True], ids=["per_variable", "buckets"])
def test_a_repeated_call_skips_the_checks_and_equals_the_full_path(buckets: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fast_vs, slow_vs = _variables(), _variables()
    fast, slow = SGD(**CONFIG, buckets=buckets), SGD(**CONFIG, buckets=buckets)
    checks = _full_checks(fast, monkeypatch)
    for step in range(8):
        g = _grads(step)
        fast.apply_gradients(zip(g, fast_vs))
        slow._last_call = None  # forgets the resolution: every call takes the full path
        slow.apply_gradients(zip(g, slow_vs))
    # the first call of each optimizer checks every gradient; `slow` checks them on each of its 8
    assert checks[0] == len(SHAPES) * (1 + 8)
    assert int(fast.iterations.numpy()) == 8
    for a, b in zip(_state(fast, fast_vs), _state(slow, slow_vs), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("buckets", [False, True], ids=["per_variable", "buckets"])
def test_a_bad_gradient_after_repeated_calls_is_refused_and_changes_nothing(buckets: bool) -> None:
    vs = _variables()
    opt = SGD(**CONFIG, buckets=buckets)
    for step in range(3):
        opt.apply_gradients(zip(_grads(step), vs))
    before = _state(opt, vs)
    bad = _grads(9)
    bad[2] = jax.device_put(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="'v2:0' has shape"):
        opt.apply_gradients(zip(bad, vs))
    bad[2] = jax.device_put(np.zeros((3, 4), np.float16))
    with pytest.raises(TypeError, match="'v2:0' has dtype float16"):
        opt.apply_gradients(zip(bad, vs))
    for a, b in zip(before, _state(opt, vs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(opt.iterations.numpy()) == 3
    opt.apply_gradients(zip(_grads(3), vs))  # a good call after the refusals steps again
    assert int(opt.iterations.numpy()) == 4


def test_a_changed_learning_rate_order_or_constraint_takes_the_full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    vs = _variables()
    opt = SGD(**CONFIG)
    checks = _full_checks(opt, monkeypatch)
    opt.apply_gradients(zip(_grads(0), vs))
    opt.apply_gradients(zip(_grads(1), vs))
    assert checks[0] == len(SHAPES)
    opt.learning_rate = 0.5  # a new config object: resolved again, and the new rate is used
    w = vs[0].numpy()
    opt.apply_gradients(zip(_grads(2), vs))
    assert checks[0] == 2 * len(SHAPES)
    assert not np.array_equal(w, vs[0].numpy())
    opt.apply_gradients(list(zip(_grads(3), vs))[::-1])  # another order of the same variables
    assert checks[0] == 3 * len(SHAPES)
    vs[1].constraint = lambda x: x * 0  # a constraint set between steps is applied on the next
    opt.apply_gradients(list(zip(_grads(4), vs))[::-1])
    assert checks[0] == 4 * len(SHAPES)
    np.testing.assert_array_equal(vs[1].numpy(), np.zeros(SHAPES[1], np.float32))


def test_a_numpy_gradient_or_a_subset_never_takes_the_repeated_path(monkeypatch: pytest.MonkeyPatch) -> None:
    vs = _variables()
    opt = SGD(**CONFIG)
    checks = _full_checks(opt, monkeypatch)
    host = [np.asarray(g) for g in _grads(0)]
    opt.apply_gradients(zip(host, vs))
    opt.apply_gradients(zip(host, vs))  # host arrays are placed by the full path each time
    assert checks[0] == 2 * len(SHAPES)
    opt.apply_gradients(zip(_grads(1), vs))
    opt.apply_gradients(zip(_grads(2)[:2], vs[:2]))  # fewer variables: the full path
    assert checks[0] == 3 * len(SHAPES) + 2
    assert int(opt.iterations.numpy()) == 4


def test_a_donated_gradient_is_refused_on_the_repeated_path() -> None:
    vs = _variables()
    opt = SGD(**CONFIG)
    g = _grads(0)
    opt.apply_gradients(zip(g, vs))
    g[3].delete()
    with pytest.raises(ValueError, match="'v3:0' is a deleted"):
        opt.apply_gradients(zip(g, vs))
    assert int(opt.iterations.numpy()) == 1
