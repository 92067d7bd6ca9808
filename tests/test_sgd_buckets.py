"""`sgdgen.SGD(buckets=True)`: the stateful optimizer on flat buckets (issue 15 item 2).

The bucketed optimizer runs the same maths as the unbucketed one over a few flat buffers,
so it is compared with it step by step. Tolerances:

- without norms every rule is elementwise and each element sees the same operations in the
  same order: bit-equal (asserted with assert_array_equal);
- with `global_clipnorm` the squares are summed in the wide type (float64) once over the
  flat bucket instead of once per variable and then across variables: the two sums differ by
  a few float64 ulps (~1e-16 relative), so the float32 scale `c / norm` differs by at most one
  float32 ulp (2**-24 relative) where they straddle a rounding boundary. Over 10 steps of
  momentum 0.9 the error of each update compounds to less than sum_k 0.9**k * 2**-24 < 10 * 2**-24
  relative to the largest update, i.e. within 1e-6 of max|ref| (docs/numerics.md §6).
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

import sgdgen
from sgdgen import Variable, reference
from sgdgen.errors import ArtifactError, StepInputError
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Layout, Mesh
from sgdgen.runtime import cpu_kernels

SHAPES = [(3,), (4, 5), (2, 3, 4), (1,), (7,), (6, 2), (300, 300), (5, 5), (8,)]
BIAS = {0, 3, 4, 8}  # excluded from weight decay ("bias" in their names)
BF16 = {1, 5}  # bfloat16 variables in the mixed-dtype model

CONFIGS = {
    "momentum_nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "ema_overwrite": dict(momentum=0.5, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=4),
    "clipvalue": dict(momentum=0.9, clipvalue=0.5, weight_decay=1e-3),
    "skip_nonfinite": dict(momentum=0.9, skip_nonfinite=True, use_ema=True),
    "global_clipnorm": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=1.0, use_ema=True),
}


def _name(i: int) -> str:
    return f"layer{i}/{'bias' if i in BIAS else 'kernel'}"


def _model(mixed: bool, seed: int = 0, mesh: Mesh | None = None) -> list[Variable]:
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(SHAPES):
        dt = ml_dtypes.bfloat16 if mixed and i in BF16 else np.float32
        lay = Layout.replicated(mesh, len(s)) if mesh is not None else None
        out.append(Variable(rng.normal(size=s).astype(dt), name=_name(i), layout=lay))
    return out


def _grads(variables: list[Variable], rng: np.random.Generator, step: int, nonfinite: bool = False) -> list:
    gs = [rng.normal(size=v.shape).astype(v.dtype) for v in variables]
    if nonfinite and step == 3:
        gs[1].reshape(-1)[0] = np.nan  # a skipped step (skip_nonfinite)
    return [jax.device_put(g, v.layout.named_sharding()) for g, v in zip(gs, variables)]


def _train(options: dict, buckets: bool, mixed: bool, steps: int = 10, **kw):
    variables = _model(mixed)
    opt = sgdgen.SGD(0.1, buckets=buckets, **options, **kw)
    opt.exclude_from_weight_decay(var_names=["bias"])
    rng = np.random.default_rng(7)
    for k in range(steps):
        opt.apply_gradients(zip(_grads(variables, rng, k, options.get("skip_nonfinite", False)), variables))
    return opt, variables


def _state(opt: sgdgen.SGD, variables: list[Variable]) -> list[np.ndarray]:
    return [np.asarray(v.numpy()) for v in variables] + opt.get_weights() + [opt.skipped_steps.numpy()]


# global_clipnorm in float32 only: one norm over mixed dtypes is not what this compares
MATRIX = [(n, m) for n in CONFIGS for m in (False, True) if not (m and "global_clipnorm" in CONFIGS[n])]


@pytest.mark.parametrize("name,mixed", MATRIX, ids=[f"{n}-{'mixed' if m else 'float32'}" for n, m in MATRIX])
def test_bucketed_equals_unbucketed_over_10_steps(name: str, mixed: bool) -> None:
    options = CONFIGS[name]
    want_opt, want_vars = _train(options, False, mixed)
    got_opt, got_vars = _train(options, True, mixed)
    plan = got_opt._flat.plan
    assert not plan.trivial and plan.members[6].own  # the (300, 300) keeps its own buffer
    assert len({plan.members[i].bucket for i in BIAS}) == 1  # exclusions: their own (no-decay) bucket
    exact = "global_clipnorm" not in options
    for g, w in zip(_state(got_opt, got_vars), _state(want_opt, want_vars), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        if exact:
            np.testing.assert_array_equal(g, w)
        else:  # one wide sum over the bucket instead of one per variable (module docstring)
            w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
            np.testing.assert_allclose(g64, w64, rtol=0, atol=1e-6 * max(np.max(np.abs(w64)), 1e-30))
    if "skip_nonfinite" in options:
        assert int(got_opt.skipped_steps.numpy()) == 1


def test_bucketed_matches_reference() -> None:
    options = CONFIGS["momentum_nesterov_wd"] | dict(use_ema=True, ema_overwrite_frequency=3)
    variables = _model(False, seed=3)
    cfg = SGDConfig.create(0.1, **options)
    ref = reference.build(cfg, [v.numpy() for v in variables])
    opt = sgdgen.SGD(0.1, buckets=True, **options)
    opt.exclude_from_weight_decay(var_names=["bias"])
    mask = [i not in BIAS for i in range(len(SHAPES))]
    rng = np.random.default_rng(5)
    for k in range(10):
        gs = _grads(variables, rng, k)
        opt.apply_gradients(zip(gs, variables))
        ref = reference.apply_gradients(cfg, ref, [np.asarray(g) for g in gs], decay_mask=mask)
    slots = opt.variables
    for v, want in zip([*slots[1:], *variables], [*ref.averages, *ref.momenta, *ref.variables], strict=True):
        w = np.asarray(want)
        # the reference computes in float32 like the program; 1e-6 of max|ref| allows for XLA's
        # fused multiply-adds (docs/numerics.md §1), as tests/test_optimizer.py does
        np.testing.assert_allclose(v.numpy(), w, rtol=0, atol=1e-6 * max(np.max(np.abs(w)), 1e-30), err_msg=v.name)
    assert int(slots[0].numpy()) == ref.iterations


@pytest.mark.parametrize("axis", [None, "batch"], ids=["replicated_slots", "zero"])
def test_mesh_with_sharded_variables_and_zero(axis: str | None) -> None:
    mesh = Mesh("batch=2,model=4")

    def run(buckets: bool):
        rng = np.random.default_rng(11)
        vs = _model(False, mesh=mesh)
        # two sharded variables: their own buffers whatever their size
        vs[1] = Variable(rng.normal(size=(4, 8)).astype(np.float32), name="sharded/a",
                         layout=Layout([None, "model"], mesh))
        vs[5] = Variable(rng.normal(size=(8, 2)).astype(np.float32), name="sharded/b",
                         layout=Layout(["batch", None], mesh))
        opt = sgdgen.SGD(0.1, momentum=0.9, use_ema=True, weight_decay=1e-2, buckets=buckets,
                         shard_update_over=axis)
        for k in range(10):
            opt.apply_gradients(zip(_grads(vs, rng, k), vs))
        return opt, vs

    want_opt, want_vars = run(False)
    got_opt, got_vars = run(True)
    plan = got_opt._flat.plan
    assert plan.members[1].own and plan.members[5].own and not plan.members[0].own
    for g, w in zip(_state(got_opt, got_vars), _state(want_opt, want_vars), strict=True):
        np.testing.assert_array_equal(g, w)
    for v in got_vars:
        assert v.value.sharding.is_equivalent_to(v.layout.named_sharding(), len(v.shape))


@pytest.mark.parametrize("direction", ["bucketed_to_plain", "plain_to_bucketed"])
def test_checkpoints_move_between_bucketed_and_unbucketed(tmp_path, direction: str) -> None:
    src_buckets = direction == "bucketed_to_plain"
    src_opt, src_vars = _train(CONFIGS["ema_overwrite"], src_buckets, mixed=True, steps=3)
    src_opt.save_checkpoint(tmp_path / "ck")
    dst_opt, dst_vars = _train(CONFIGS["ema_overwrite"], not src_buckets, mixed=True, steps=1)
    dst_opt.restore_checkpoint(tmp_path / "ck")
    for g, w in zip(_state(dst_opt, dst_vars), _state(src_opt, src_vars), strict=True):
        np.testing.assert_array_equal(g, w)
    # and back: the restored optimizer saves what it holds, bit-identically
    dst_opt.save_checkpoint(tmp_path / "back")
    src_opt.restore_checkpoint(tmp_path / "back")
    for g, w in zip(_state(src_opt, src_vars), _state(dst_opt, dst_vars), strict=True):
        np.testing.assert_array_equal(g, w)


def test_set_get_weights_assign_and_finalize() -> None:
    opt, vs = _train(CONFIGS["ema_overwrite"], True, mixed=False, steps=2)
    ref_opt, ref_vs = _train(CONFIGS["ema_overwrite"], False, mixed=False, steps=2)
    rng = np.random.default_rng(2)
    new = [rng.normal(size=w.shape).astype(w.dtype) for w in opt.get_weights()[1:]]
    slots = [opt._flat.buffers[0][r] for r in ("momentum", "average")]
    before = [b.array for b in slots]
    opt.set_weights([np.int64(5), *new])
    ref_opt.set_weights([np.int64(5), *new])
    assert all(b.array is not a for a, b in zip(before, slots))  # written into the slot buckets, once each
    for g, w in zip(opt.get_weights(), [np.int64(5), *new]):
        np.testing.assert_array_equal(g, w)
    vs[2].assign(np.full((2, 3, 4), 3.0, np.float32))
    ref_vs[2].assign(np.full((2, 3, 4), 3.0, np.float32))
    np.testing.assert_array_equal(vs[2].numpy(), np.full((2, 3, 4), 3.0, np.float32))
    np.testing.assert_array_equal(np.asarray(vs[2].value), vs[2].numpy())
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    opt.apply_gradients(zip(_grads(vs, rng_a, 0), vs))
    ref_opt.apply_gradients(zip(_grads(ref_vs, rng_b, 0), ref_vs))
    opt.finalize_variable_values(vs)
    ref_opt.finalize_variable_values(ref_vs)
    for g, w in zip(_state(opt, vs), _state(ref_opt, ref_vs), strict=True):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(StepInputError):  # a bad array: nothing written
        opt.set_weights([np.int64(1), *new[:-1], np.zeros((2, 2), np.float32)])
    np.testing.assert_array_equal(opt.get_weights()[0], np.int64(6))


def test_views_cached_until_the_bucket_changes() -> None:
    opt, vs = _train(CONFIGS["clipvalue"], True, mixed=False, steps=1)
    first = vs[0].value
    assert vs[0].value is first  # one slice per change of the bucket, then cached
    opt.apply_gradients(zip(_grads(vs, np.random.default_rng(0), 0), vs))
    assert vs[0].value is not first and not first.is_deleted()  # a slice of the old bucket, still readable
    assert vs[6].value is vs[6]._array  # the large variable is its own buffer


def test_views_read_in_turn_are_placed_together_in_buffers_of_their_own() -> None:
    """Views read one after another after a step (a forward pass) are placed together once the
    second is read, each in its own buffer: the next step donates the bucket and they stay intact."""
    from sgdgen import backend

    opt, vs = _train(CONFIGS["clipvalue"], True, mixed=False, steps=1)
    buffer = next(v._view for v in vs if v._view is not None)
    flat = [v for v in vs if v._view is buffer]  # the views of one bucket
    assert len(flat) > 2
    first, second = flat[0].value, flat[1].value
    assert all(x is not None for x in buffer._values)  # the rest were placed with the second
    values = [first, second] + [v.value for v in flat[2:]]
    want = [np.array(v.numpy()) for v in flat]
    (start,) = backend.buffer_pointers(buffer.array)
    end = start + buffer.array.nbytes
    for x in values:
        (p,) = backend.buffer_pointers(x)
        assert not start <= p < end  # not a view into the bucket the next step donates
    opt.apply_gradients(zip(_grads(vs, np.random.default_rng(1), 1), vs))
    for x, w in zip(values, want, strict=True):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), w)


def test_missing_gradient_of_a_flat_member_changes_nothing() -> None:
    opt, vs = _train(CONFIGS["momentum_nesterov_wd"], True, mixed=False, steps=1)
    before = _state(opt, vs)
    grads = _grads(vs, np.random.default_rng(0), 0)
    grads[2] = None
    with pytest.raises(StepInputError, match=r"layer2/kernel.*buckets=False"):
        opt.apply_gradients(zip(grads, vs))
    for g, w in zip(_state(opt, vs), before):
        np.testing.assert_array_equal(g, w)
    grads = _grads(vs, np.random.default_rng(0), 0)
    grads[6] = None  # an own-buffer variable may skip a step, with Keras' warning
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.apply_gradients(zip(grads, vs))
    np.testing.assert_array_equal(vs[6].numpy(), before[6])
    fresh = _model(False)
    unbuilt = sgdgen.SGD(0.1, buckets=True)
    with pytest.raises(StepInputError, match="layer0/bias"):  # refused before build creates anything
        unbuilt.apply_gradients([(None, fresh[0])] + [(np.zeros(v.shape, np.float32), v) for v in fresh[1:]])
    assert unbuilt._flat is None and not unbuilt._built


def test_minimize_and_compute_gradients_are_flat() -> None:
    import jax.numpy as jnp

    def loss(vs):
        return lambda: sum(jnp.sum(jnp.sin(v.value) * (k + 1)) for k, v in enumerate(vs))

    got_opt, got = _train(CONFIGS["momentum_nesterov_wd"], True, mixed=False, steps=1)
    want_opt, want = _train(CONFIGS["momentum_nesterov_wd"], False, mixed=False, steps=1)
    pairs = got_opt.compute_gradients(loss(got), got)
    ref_pairs = want_opt.compute_gradients(loss(want), want)
    assert got_opt._last_flat_grads is not None  # taken with respect to the buckets
    for (g, v), (w, _) in zip(pairs, ref_pairs, strict=True):
        assert g.shape == v.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    for _ in range(3):
        got_opt.minimize(loss(got), got)
        want_opt.minimize(loss(want), want)
    for g, w in zip(_state(got_opt, got), _state(want_opt, want), strict=True):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(StepInputError, match="layer0/bias"):  # a member the loss does not read
        got_opt.minimize(lambda: jnp.sum(got[1].value), got)


def test_artifact_round_trip(tmp_path) -> None:
    opt, vs = _train(CONFIGS["momentum_nesterov_wd"], True, mixed=False, steps=0)
    opt.build(vs)
    opt.save_artifact(tmp_path / "art")
    fresh = _model(False)
    # this dtype has a decayed and an excluded flat bucket: the manifest records each member's flag
    loaded = sgdgen.SGD.load_artifact(tmp_path / "art", fresh)
    assert loaded.config.buckets and loaded._flat.plan.buckets == opt._flat.plan.buckets
    assert loaded._flat.plan.variables == opt._flat.plan.variables  # decay flags included
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    for k in range(3):
        opt.apply_gradients(zip(_grads(vs, rng_a, k), vs))
        loaded.apply_gradients(zip(_grads(fresh, rng_b, k), fresh))
    for g, w in zip(_state(loaded, fresh), _state(opt, vs), strict=True):
        np.testing.assert_array_equal(g, w)
    other = _model(False)
    other[0] = Variable(np.zeros((4,), np.float32), name=_name(0))  # another shape: another plan
    with pytest.raises(ArtifactError):
        sgdgen.SGD.load_artifact(tmp_path / "art", other,
                                 exclude_from_weight_decay=[v for i, v in enumerate(other) if i in BIAS])


def test_an_artifact_without_recorded_members_needs_the_exclusions(tmp_path) -> None:
    """Artifacts written before `members` was recorded (format 2 without it): where a dtype has a
    decayed and an excluded flat bucket the exclusions must be given, and then it loads."""
    from sgdgen.io import artifact
    from sgdgen.runtime.program import StepProgram

    opt, vs = _train(CONFIGS["momentum_nesterov_wd"], True, mixed=False, steps=0)
    opt.build(vs)
    artifact.write(StepProgram(opt.config, opt._flat.plan.buckets, opt.mesh), tmp_path / "old", platforms=())
    assert "members" not in artifact.read(tmp_path / "old").manifest.to_json()
    fresh = _model(False)
    with pytest.raises(ArtifactError, match="exclude_from_weight_decay"):
        sgdgen.SGD.load_artifact(tmp_path / "old", fresh)
    excluded = [v for i, v in enumerate(fresh) if i in BIAS]
    loaded = sgdgen.SGD.load_artifact(tmp_path / "old", fresh, exclude_from_weight_decay=excluded)
    assert loaded._flat.plan.buckets == opt._flat.plan.buckets


def test_recorded_members_are_bound_to_the_module(tmp_path) -> None:
    """Editing a member's decay flag in manifest.json breaks the binding: refused at load."""
    import json

    opt, vs = _train(CONFIGS["momentum_nesterov_wd"], True, mixed=False, steps=0)
    opt.build(vs)
    opt.save_artifact(tmp_path / "art", platforms=())
    path = tmp_path / "art" / "manifest.json"
    data = json.loads(path.read_text())
    k = sorted(BIAS)[0]
    data["members"][k]["decay"] = not data["members"][k]["decay"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError):
        sgdgen.SGD.load_artifact(tmp_path / "art", _model(False))


def test_the_bucketed_step_takes_a_handful_of_arguments() -> None:
    opt, vs = _train(CONFIGS["ema_overwrite"], True, mixed=True, steps=1)
    steps = {bool(s.program.gradient_segments): s for s in opt._steps.values()}
    buffers = len(opt._flat.plan.buckets)  # float32 decayed, float32 no-decay, bfloat16, the large one
    assert buffers == 4
    # iterations + (variable, momentum, average, gradient) per buffer + the learning rate
    assert len(steps[False].abi.inputs) == 1 + 4 * buffers + 1 < 4 * len(vs)
    # where kernels read segments (CPU), a second program takes each member's gradient as it is: the
    # state stays one buffer per role and bucket
    assert (True in steps) == cpu_kernels.available()
    if True in steps:
        assert len(steps[True].abi.inputs) == 1 + 3 * buffers + len(vs) + 1


def test_config_keys_only_when_set_validated_and_round_trip() -> None:
    assert "buckets" not in sgdgen.SGD(0.1).get_config()
    opt = sgdgen.SGD(0.1, buckets=True, bucket_threshold=100)
    cfg = opt.get_config()
    assert cfg["buckets"] is True and cfg["bucket_threshold"] == 100
    again = sgdgen.SGD.from_config(cfg)
    assert again.config.buckets and again.config.bucket_threshold == 100
    with pytest.raises(ValueError, match="bucket_threshold"):
        sgdgen.SGD(0.1, buckets=True, bucket_threshold=0)
    with pytest.raises(TypeError, match="buckets"):
        sgdgen.SGD(0.1, buckets="yes")


def test_clipnorm_buckets_nothing() -> None:
    opt, _ = _train(dict(momentum=0.9, clipnorm=1.0), True, mixed=False, steps=1)
    assert opt._flat is None  # a per-variable norm is not a flat rule: the optimizer is the unbucketed one


def test_update_step_and_constraints_write_into_the_bucket() -> None:
    def make(buckets: bool):
        vs = _model(False, seed=8)
        vs[2].constraint = lambda w: w * (w >= 0)  # NonNeg, applied after each step
        opt = sgdgen.SGD(0.1, momentum=0.9, buckets=buckets)
        rng = np.random.default_rng(3)
        for k in range(3):
            opt.apply_gradients(zip(_grads(vs, rng, k), vs))
        opt.update_step(np.full((7,), 0.5, np.float32), vs[4])  # a member of a flat bucket, alone
        return opt, vs

    (got_opt, got), (want_opt, want) = make(True), make(False)
    assert got[2]._view is not None and got[4]._view is not None
    assert np.all(got[2].numpy() >= 0)
    for g, w in zip(_state(got_opt, got), _state(want_opt, want), strict=True):
        np.testing.assert_array_equal(g, w)
