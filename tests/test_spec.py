"""Mesh, Layout and VarSpec: parsing, validation messages, and the three conversions,
checked against JAX's own NamedSharding where JAX has an answer."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sgdgen
from sgdgen import reference
from sgdgen.frontend.spec import Layout, Mesh, SpecError, VarSpec

MESH = Mesh.parse("batch=2,model=4")


def test_mesh_forms_agree() -> None:
    assert Mesh({"batch": 2, "model": 4}) == MESH == Mesh.of("batch=2, model=4")
    assert MESH.axis_names == ("batch", "model") and MESH.size == 8 and MESH.device_ids == tuple(range(8))
    jm = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "model"))
    assert Mesh.from_jax(jm) == MESH
    assert Mesh.of(None).size == 1 and str(Mesh.of(None)) == ""
    assert Mesh.from_json(MESH.to_json()) == MESH


def test_one_constructor_takes_every_mesh_form() -> None:
    """README's forms: a string, a dict, a jax Mesh, a Keras 3 DeviceMesh, a Mesh, pairs."""
    os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is first imported, as tests/test_parity.py
    import keras

    devices = jax.devices()[:8]
    permuted = [devices[i] for i in (7, 6, 5, 4, 3, 2, 1, 0)]
    jm = jax.sharding.Mesh(np.array(permuted).reshape(2, 4), ("batch", "model"))
    km = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices=permuted)
    km_default = keras.distribution.DeviceMesh((2, 4), ["batch", "model"])  # Keras' "cpu:N" device names
    for form in ("batch=2,model=4", {"batch": 2, "model": 4}, [("batch", 2), ("model", 4)], MESH, km_default):
        assert sgdgen.Mesh(form) == MESH, form
    for form in (jm, km):  # a jax or Keras mesh keeps its device order
        got = sgdgen.Mesh(form)
        assert got.shape == MESH.shape and got.device_ids == (7, 6, 5, 4, 3, 2, 1, 0), form
    assert sgdgen.Mesh(None) == sgdgen.Mesh(()) == sgdgen.Mesh("") and sgdgen.Mesh(None).size == 1
    assert Mesh.of(MESH) is MESH and Mesh.of(jm) == sgdgen.Mesh(jm) and Mesh.from_jax(jm) == sgdgen.Mesh(jm)
    assert sgdgen.Mesh("batch=2,model=4", device_ids=range(7, -1, -1)).device_ids == (7, 6, 5, 4, 3, 2, 1, 0)


def test_a_mesh_from_something_else_says_which_forms_work() -> None:
    with pytest.raises(SpecError, match=r"cannot make a mesh from int 8; pass \"batch=2,model=4\", a dict .*"
                                        r"jax.sharding.Mesh or a keras.distribution.DeviceMesh"):
        sgdgen.Mesh(8)


def test_layout_checks_its_axes_at_construction() -> None:
    """As DTensor's Layout: an axis the mesh lacks fails when the Layout is made, not at the Variable."""
    with pytest.raises(SpecError, match=r"^layout names mesh axis 'modle' on dimension 1, "
                                        r"but the mesh has axes \['batch', 'model'\]; use one of those or 'unsharded'"):
        sgdgen.Layout(["unsharded", "modle"], "batch=2,model=4")
    with pytest.raises(SpecError, match="mesh axis 'x' on dimension 0"):
        sgdgen.Layout([("batch", "x")], MESH)
    assert sgdgen.Layout(["unsharded", ("batch", "model")], MESH).used_axes == ("batch", "model")


@pytest.mark.parametrize("text, message", [
    ("batch", "is not NAME=SIZE"),
    ("batch=two", "is not NAME=SIZE"),
    ("batch=0", "has size 0"),
    ("batch=2,batch=4", "'batch' is given twice"),
    ("2d=2", "not an identifier"),
    ("unsharded=2", "may not be called 'unsharded'"),
])
def test_bad_meshes_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Mesh.parse(text)


@pytest.mark.parametrize("specs, message", [
    (["unsharded"], "layout .* has rank 1 but the shape \\[8, 16\\] has rank 2"),
    (["data", "unsharded"], "layout names mesh axis 'data' on dimension 0, but the mesh has axes "
                            "\\['batch', 'model'\\]; use one of those"),
    (["model", "model"], "mesh axis 'model' is used twice in layout"),
    (["unsharded", ("batch", "model")], None),
    (["batch", "model"], None),
])
def test_layout_validation_names_the_variable(specs: list, message: str | None) -> None:
    if message is None:
        VarSpec.create("dense/kernel", [8, 16], "float32", MESH, specs)
        return
    with pytest.raises(SpecError, match="variable 'dense/kernel': " + message):
        VarSpec.create("dense/kernel", [8, 16], "float32", MESH, specs)


def test_indivisible_dimension_says_how_to_fix_it() -> None:
    with pytest.raises(SpecError, match=r"'w': dimension 1 of size 15 is not divisible by 4 .*pad the dimension"):
        VarSpec.create("w", [8, 15], "float32", MESH, ["unsharded", "model"])


@pytest.mark.parametrize("dtype", ["int32", "complex64", "bool"])
def test_non_float_dtypes_are_refused(dtype: str) -> None:
    with pytest.raises(SpecError, match="floating variables only"):
        VarSpec.create("w", [4], dtype, MESH)


def test_sdy_text_and_local_shape() -> None:
    lay = Layout(["unsharded", "model"], MESH)
    assert lay.sdy_text() == '#sdy.sharding<@mesh, [{}, {"model"}]>'
    assert Layout([("batch", "model"), None], MESH).sdy_text() == '#sdy.sharding<@mesh, [{"batch", "model"}, {}]>'
    assert Layout.replicated(MESH, 0).sdy_text() == "#sdy.sharding<@mesh, []>"
    assert lay.local_shape((8, 16)) == (8, 4)
    assert Layout([("batch", "model"), None], MESH).local_shape((16, 8)) == (2, 8)
    assert lay.replicated_axes == ("batch",)
    assert MESH.sdy_mesh_text() == 'sdy.mesh @mesh = <["batch"=2, "model"=4]>'


@pytest.mark.parametrize("specs, pspec", [
    (["unsharded", "model"], P(None, "model")),
    (["batch", "model"], P("batch", "model")),
    (["model", "batch"], P("model", "batch")),
    (["model", "unsharded"], P("model", None)),
    ([("batch", "model"), "unsharded"], P(("batch", "model"), None)),
    (["unsharded", "unsharded"], P(None, None)),
])
def test_hlo_sharding_matches_jax(specs: list, pspec: P) -> None:
    """The mhlo.sharding string equals what JAX derives for the same NamedSharding."""
    lay = Layout(specs, MESH)
    assert lay.partition_spec() == pspec
    jm = MESH.to_jax()
    want = NamedSharding(jm, pspec)._to_xla_hlo_sharding(2)
    assert type(want).from_string(lay.hlo_sharding_text()) == want
    assert lay.named_sharding() == NamedSharding(jm, pspec)


def test_permuted_devices_run_the_same_step() -> None:
    """A mesh over devices in another order: the program is the same (partition k runs on
    device_ids[k]); the results stay on the given devices and equal the reference."""
    devs = np.array(jax.devices()[:8])[::-1].reshape(2, 4)
    mesh = Mesh.from_jax(jax.sharding.Mesh(devs, ("batch", "model")))
    assert mesh.device_ids == (7, 6, 5, 4, 3, 2, 1, 0)
    rng = np.random.default_rng(0)
    init = [rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)]
    vs = [sgdgen.Variable(init[0], layout=Layout(["batch", "model"], mesh), name="perm/kernel"),
          sgdgen.Variable(init[1], layout=Layout([None], mesh), name="perm/bias")]
    opt = sgdgen.SGD(0.1, momentum=0.9, global_clipnorm=1.0, use_ema=True, mesh=mesh)
    state = reference.build(opt.config, init)
    for _ in range(5):
        grads = [rng.standard_normal(x.shape).astype(np.float32) for x in init]
        opt.apply_gradients(zip(grads, vs))
        state = reference.apply_gradients(opt.config, state, grads)
    for v, r in zip(vs, state.variables):
        np.testing.assert_allclose(v.numpy(), r, rtol=0, atol=1e-6 * np.abs(r).max())
    assert vs[0].value.sharding.mesh.devices.flat[0].id == 7
