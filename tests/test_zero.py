"""Weight-update sharding (issue 13): `shard_update_over=` / `sgd-shard-weight-update{axis=...}`.

The ZeRO'd step is compared with the unsharded step (the same program without the pass) over
10 steps. Tolerance: 1e-6 of max|ref| (issue 13); where only the norm's summation order changes
(clipnorm / global_clipnorm: partials over 1/N slices instead of whole shards, summed in f64)
the f32 results still agree to within that bound, and without norms they are bit-equal, which
is asserted separately.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import sgdgen
from sgdgen import Variable
from sgdgen.codegen.abi import StepABI
from sgdgen.codegen.pipeline import PipelineError, build_pass_manager, pipeline_for
from sgdgen.codegen.ir import make_context
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Layout, Mesh, VarSpec
from sgdgen.frontend.zero import pad, shard_plan, unpad

OPTIONS = [
    dict(momentum=0.0),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.9, global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=3),
    dict(momentum=0.5, clipnorm=0.5, clipvalue=0.3, use_ema=True),
]
MESHES = [
    ("data=8", "data", {"w": [None, None], "b": [None], "odd": [None, None]}),
    ("batch=2,model=4", "batch", {"w": [None, "model"], "b": [None], "odd": [None, None]}),
    ("batch=2,model=2,x=2", "model", {"w": ["batch", "x"], "b": [None], "odd": [None, "x"]}),
]
SHAPES = {"w": (8, 16), "b": (3,), "odd": (5, 6)}


def _train(mesh_text: str, layouts: dict, options: dict, axis: str | None, steps: int = 10):
    mesh = Mesh(mesh_text)
    rng = np.random.default_rng(1)
    init = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    vs = [Variable(init[n], layout=Layout(layouts[n], mesh), name=n) for n in SHAPES]
    opt = sgdgen.SGD(0.1, shard_update_over=axis, **options)
    for _ in range(steps):
        grads = [jax.device_put(rng.normal(size=v.shape).astype(np.float32), v.layout.named_sharding()) for v in vs]
        opt.apply_gradients(zip(grads, vs))
    return [v.numpy() for v in vs] + [s.numpy() for s in opt.variables[1:]], opt


@pytest.mark.parametrize("mesh_text,axis,layouts", MESHES, ids=[m[0] for m in MESHES])
@pytest.mark.parametrize("options", OPTIONS, ids=range(len(OPTIONS)))
def test_zero_equals_unsharded_over_10_steps(mesh_text, axis, layouts, options):
    want, _ = _train(mesh_text, layouts, options, None)
    got, opt = _train(mesh_text, layouts, options, axis)
    exact = not any(k in options for k in ("clipnorm", "global_clipnorm"))
    for g, w in zip(got, want):
        assert g.shape == w.shape  # slots read back unpadded
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * max(np.max(np.abs(w)), 1e-30))
    # the slots really are sharded: 1/N of the (padded) slot per device on the ZeRO axis
    n = Mesh(mesh_text).axis_size(axis)
    for s in opt.variables[1:]:
        per_device = s.value.sharding.shard_shape(s.value.shape)
        assert np.prod(per_device) * n == np.prod(s.value.shape) or axis in sum(map(list, s.layout.dims), [])


def test_zero_lowered_has_all_gather_and_one_all_reduce():
    mesh = Mesh("batch=2,model=4")
    specs = (VarSpec("w", (8, 16), "float32", Layout([None, "model"], mesh)),)
    from sgdgen.runtime.program import StepProgram
    prog = StepProgram(SGDConfig.create(0.1, global_clipnorm=1.0, shard_update_over="batch"), specs, mesh)
    text = prog.lowered_text
    assert text.count('"stablehlo.all_reduce"') == 1 and text.count('"stablehlo.all_gather"') == 1
    assert "stablehlo.dynamic_slice" in text
    assert prog.abi.slot("momentum", 0).layout.dims == (("batch",), ("model",))


def test_jax_step_inside_user_jit_equals_unsharded():
    mesh = Mesh("batch=2,model=4")
    jmesh = mesh.to_jax()
    rng = np.random.default_rng(2)
    params = {"w": rng.normal(size=(8, 16)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    layouts = {"w": jax.sharding.PartitionSpec(None, "model"), "b": jax.sharding.PartitionSpec(None)}
    put = lambda t: {k: jax.device_put(v, jax.sharding.NamedSharding(jmesh, layouts[k])) for k, v in t.items()}
    results = []
    for axis in (None, "batch"):
        step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9, use_ema=True, shard_update_over=axis),
                               params, mesh=mesh, layouts=layouts)
        p, state = put(params), step.init(put(params))
        f = jax.jit(lambda p, g, s: step(p, g, s))
        for k in range(10):
            g = put({n: np.full(v.shape, 0.1 * (k + 1), np.float32) for n, v in params.items()})
            p, state = f(p, g, state)
        results.append((p, state))
    (p0, s0), (p1, s1) = results
    for n in params:  # inside the user's jit XLA fuses the sliced chain its own way: 1e-6 of max|ref|
        want = np.asarray(p0[n])
        np.testing.assert_allclose(np.asarray(p1[n]), want, rtol=0, atol=1e-6 * np.max(np.abs(want)))
    b = 0  # the bias' slots are padded (3 over 2 devices -> 4): logical values are the first 3
    want = np.asarray(s0.momenta[b])
    np.testing.assert_allclose(np.asarray(s1.momenta[b])[:3], want, rtol=0, atol=1e-6 * np.max(np.abs(want)))


def test_shard_plan_pads_and_unpads():
    plan = shard_plan((6, 5), ((), ("m",)), {"m": 5, "d": 4}, "d")
    assert plan.dim == 0 and plan.padded and plan.slot_shape == (8, 5) and plan.slot_dims == (("d",), ("m",))
    x = np.arange(30, dtype=np.float32).reshape(6, 5)
    np.testing.assert_array_equal(unpad(plan, pad(plan, x)), x)
    assert shard_plan((8,), (("d",),), {"d": 4}, "d") is None  # already sharded on the axis: left alone
    assert shard_plan((), (), {"d": 4}, "d") is None


def test_config_key_only_when_set_and_round_trips():
    assert "shard_update_over" not in SGDConfig.create().get_config()
    c = SGDConfig.create(shard_update_over="batch")
    assert c.get_config()["shard_update_over"] == "batch"
    assert SGDConfig.from_config(c.get_config()) == c
    with pytest.raises(ValueError, match="shard_update_over"):
        SGDConfig.create(shard_update_over=3)


def test_unknown_axis_refused_by_abi():
    mesh = Mesh("batch=2,model=4")
    specs = (VarSpec("w", (8, 16), "float32", Layout([None, "model"], mesh)),)
    with pytest.raises(sgdgen.errors.ConfigError, match="'data' is not an axis"):
        StepABI.for_config(specs, mesh, SGDConfig.create(shard_update_over="data"))


def test_pipeline_options_parsed_and_checked():
    assert "sgd-shard-weight-update{axis=batch}" in pipeline_for("batch")
    ctx = make_context()
    build_pass_manager(pipeline_for("batch"), ctx)
    with pytest.raises(PipelineError, match="unknown or empty option"):
        build_pass_manager("builtin.module(sgd-shard-weight-update{axes=batch})", ctx)
    with pytest.raises(PipelineError, match="takes no options"):
        build_pass_manager("builtin.module(sgd-fuse-step{axis=batch})", ctx)


@pytest.mark.parametrize("source,target", [(True, False), (False, True), (True, True)],
                         ids=["zero-to-unsharded", "unsharded-to-zero", "zero-to-zero"])
def test_checkpoints_move_between_sharded_and_unsharded_optimizers(tmp_path, source: bool, target: bool) -> None:
    """A checkpoint holds each slot's logical value (a padded ZeRO slot unpadded), so it restores
    onto an optimizer with or without weight-update sharding, bit-identical; the 3-element
    variable needs padding over 8 devices, the 16x4 one does not."""
    mesh = sgdgen.Mesh({"data": 8})
    shapes = [(16, 4), (3,)]

    def make(zero: bool, seed: int) -> tuple[sgdgen.SGD, list[sgdgen.Variable]]:
        rng = np.random.default_rng(seed)
        vs = [sgdgen.Variable(rng.standard_normal(s).astype(np.float32),
                              layout=sgdgen.Layout(["unsharded"] * len(s), mesh), name=f"v{i}")
              for i, s in enumerate(shapes)]
        kw = dict(learning_rate=0.1, momentum=0.9, use_ema=True, mesh=mesh)
        opt = sgdgen.SGD(**kw, **({"shard_update_over": "data"} if zero else {}))
        opt.build(vs)
        return opt, vs

    saved, vs = make(source, 0)
    rng = np.random.default_rng(1)
    for _ in range(3):
        saved.apply_gradients([(rng.standard_normal(v.shape).astype(np.float32), v) for v in vs])
    saved.save_checkpoint(tmp_path / "ckpt")
    restored, vr = make(target, 5)
    restored.restore_checkpoint(tmp_path / "ckpt")
    bits = lambda opt, variables: [x.numpy().tobytes() for x in [*opt.variables, *variables]]
    assert bits(restored, vr) == bits(saved, vs)
    grads = [np.full(v.shape, 0.25, np.float32) for v in vs]
    saved.apply_gradients(zip(grads, vs))
    restored.apply_gradients(zip(grads, vr))  # and it trains on from there
    np.testing.assert_allclose(vr[1].numpy(), vs[1].numpy(), rtol=0, atol=1e-6 * float(np.abs(vs[1].numpy()).max()))
