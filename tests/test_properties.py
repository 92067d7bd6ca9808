"""Property tests (hypothesis): random configs, shapes, dtypes, meshes and layouts against the
NumPy oracle `sgdgen.reference`, and random bad inputs that must be refused with nothing changed
(gradients of the wrong shape, dtype or layout, deleted arrays, non-finite hyperparameters; and,
exhaustively since the space is small, artifacts loaded onto mismatched variables).

Tolerances are SEMANTICS decisions 10 and 12: float32 over several steps at rtol 1e-6 and
atol 1e-6 * max|ref| (XLA may contract into FMAs; the reference is unfused); float16 and
bfloat16 per step at 2 ulp of the slot's scale (max|ref|), since 16-bit rounding differences
of one step would otherwise compound. `iterations` is exact.

Each example compiles a new program (about 0.3-1 s), so the example counts are CI-sized
(EXAMPLES per property, derandomized so CI runs the same examples every time); the count
actually run is printed.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sgdgen
from sgdgen import reference
from sgdgen.errors import SgdgenError
from support.stepdriver import ulp

EXAMPLES = 25
STEPS = 4
MESHES = [sgdgen.Mesh(()), sgdgen.Mesh({"x": 2}), sgdgen.Mesh({"batch": 2, "model": 4}), sgdgen.Mesh({"a": 4})]
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    """SGD keyword arguments: momentum, Nesterov, weight decay, one clip option, EMA."""
    kw: dict[str, Any] = {"learning_rate": draw(st.sampled_from([0.01, 0.1, 0.5])),
                          "momentum": draw(st.sampled_from([0.0, 0.5, 0.9])),
                          "nesterov": draw(st.booleans())}
    if draw(st.booleans()):
        kw["weight_decay"] = draw(st.sampled_from([1e-3, 0.05]))
    clip = draw(st.sampled_from([None, "clipnorm", "clipvalue", "global_clipnorm"]))
    if clip:
        kw[clip] = draw(st.sampled_from([0.1, 1.0]))
    if draw(st.booleans()):
        kw.update(use_ema=True, ema_momentum=draw(st.sampled_from([0.5, 0.99])),
                  ema_overwrite_frequency=draw(st.sampled_from([None, 2])))
    return kw


@st.composite
def models(draw: Any, dtypes: list[Any]) -> tuple[sgdgen.Mesh, list[tuple[str, tuple[int, ...], Any, list[Any]]]]:
    """A mesh and 1-3 variables (name, shape, dtype, layout specs): each dimension unsharded or
    sharded by a mesh axis no other dimension of it uses, with a size divisible by its shards."""
    mesh = draw(st.sampled_from(MESHES))
    out = []
    for k in range(draw(st.integers(1, 3))):
        rank = draw(st.integers(0, 2))
        free = list(mesh.axis_names)
        shape, specs = [], []
        for _ in range(rank):
            axis = draw(st.sampled_from([None, *free]))
            shards = mesh.axis_size(axis) if axis else 1
            if axis:
                free.remove(axis)
            shape.append(shards * draw(st.integers(1, 3)))
            specs.append(axis or "unsharded")
        out.append((f"v{k}/w", tuple(shape), draw(st.sampled_from(dtypes)), specs))
    return mesh, out


def _build(mesh: sgdgen.Mesh, spec: list[Any], config: dict[str, Any], seed: int) -> tuple[sgdgen.SGD, list[Any]]:
    rng = np.random.default_rng(seed)
    variables = [sgdgen.Variable(rng.standard_normal(shape).astype(dtype), layout=sgdgen.Layout(specs, mesh),
                                 name=name) for name, shape, dtype, specs in spec]
    opt = sgdgen.SGD(**config, mesh=mesh)
    opt.build(variables)
    return opt, variables


def _state(opt: sgdgen.SGD, variables: list[Any]) -> dict[str, list[np.ndarray]]:
    n = len(variables)
    slots = opt.variables[1:]
    averages = slots[:n] if opt.config.use_ema else []
    return {"variables": [v.numpy() for v in variables], "momenta": [m.numpy() for m in slots[-n:]],
            "averages": [a.numpy() for a in averages]}


def _compare(opt: sgdgen.SGD, variables: list[Any], ref: reference.RefState, where: str) -> None:
    got = _state(opt, variables)
    want = {"variables": ref.variables, "momenta": ref.momenta, "averages": ref.averages or []}
    assert int(opt.iterations.numpy()) == ref.iterations, where
    for role, arrays in want.items():
        for k, (g, r) in enumerate(zip(got[role], arrays)):
            r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
            scale = float(np.max(np.abs(r64))) if r64.size else 0.0
            if np.dtype(r.dtype) == np.float32:
                tol = 1e-6 * abs(r64) + 1e-6 * scale  # decision 10
            else:
                tol = np.full(r64.shape, 2 * ulp(scale, r.dtype))  # decision 12: 2 ulp of scale
            bad = np.abs(g64 - r64) > tol
            assert not bad.any(), (f"{where}: {role}[{k}] ({r.dtype}) differs from the reference at "
                                   f"{np.argwhere(bad)[:3].tolist()}: got {g64[bad][:3]}, want {r64[bad][:3]}")
    assert len(got["averages"]) == len(want["averages"]), where


def _run_property(test: Any, capsys: pytest.CaptureFixture[str], what: str) -> None:
    """Runs a @given test, counting the examples hypothesis ran, and prints the count."""
    count = [0]
    inner = test.hypothesis.inner_test

    def counted(*args: Any, **kw: Any) -> Any:
        count[0] += 1
        return inner(*args, **kw)

    test.hypothesis.inner_test = counted
    test()
    with capsys.disabled():
        print(f"\n{what}: {count[0]} hypothesis examples")
    assert count[0] >= EXAMPLES // 2, f"hypothesis ran only {count[0]} examples"


def test_float32_steps_match_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    @SETTINGS
    @given(config=configs(), model=models([np.float32]), seed=st.integers(0, 2**16))
    def check(config: dict[str, Any], model: Any, seed: int) -> None:
        mesh, spec = model
        opt, variables = _build(mesh, spec, config, seed)
        ref = reference.build(opt.config, [v.numpy() for v in variables])
        rng = np.random.default_rng(seed + 1)
        for step in range(STEPS):
            grads = [rng.standard_normal(v.shape).astype(v.dtype) for v in variables]
            opt.apply_gradients(zip(grads, variables))
            ref = reference.apply_gradients(opt.config, ref, grads)
            _compare(opt, variables, ref, f"{config} on {mesh or 'one device'}, {spec}, step {step + 1}")

    _run_property(check, capsys, f"float32, {STEPS} steps")


def test_16bit_step_matches_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    @SETTINGS
    @given(config=configs(), model=models([np.float16, ml_dtypes.bfloat16, np.float32]), seed=st.integers(0, 2**16))
    def check(config: dict[str, Any], model: Any, seed: int) -> None:
        mesh, spec = model
        if "global_clipnorm" in config:  # refused by design for mixed dtypes (GenerateError): one dtype
            spec = [(name, shape, spec[0][2], specs) for name, shape, _, specs in spec]
        opt, variables = _build(mesh, spec, config, seed)
        ref = reference.build(opt.config, [v.numpy() for v in variables])
        rng = np.random.default_rng(seed + 1)
        for step in range(2):  # each step compared from the reference's own previous state
            grads = [rng.standard_normal(v.shape).astype(v.dtype) for v in variables]
            opt.apply_gradients(zip(grads, variables))
            ref = reference.apply_gradients(opt.config, ref, grads)
            _compare(opt, variables, ref, f"{config} on {mesh or 'one device'}, {spec}, step {step + 1}")
            opt.set_weights([ref.iterations, *(ref.averages or []), *ref.momenta])
            for v, r in zip(variables, ref.variables):
                v.assign(r)

    _run_property(check, capsys, "16-bit, per step")


BAD = ["shape", "dtype", "layout", "deleted"]


def _bad_gradient(kind: str, v: sgdgen.Variable, mesh: sgdgen.Mesh) -> Any:
    good = np.ones(v.shape, v.dtype)
    if kind == "shape":
        return np.ones((*v.shape, 2), v.dtype)
    if kind == "dtype":
        return good.astype(np.float16 if v.dtype != np.float16 else np.float32)
    if kind == "layout":  # the right values on the mesh, sharded along another dimension or axis
        other = _other_layout(v, mesh)
        return jax.device_put(good, other.named_sharding()) if other is not None else None
    array = jax.device_put(good, v.layout.named_sharding())
    array.delete()
    return array


def _other_layout(v: sgdgen.Variable, mesh: sgdgen.Mesh) -> sgdgen.Layout | None:
    """A layout of `v`'s shape on `mesh` whose sharding is not equivalent to `v`'s, if one exists."""
    want = v.layout.named_sharding()
    for axis in mesh.axis_names:
        for dim, n in enumerate(v.shape):
            if n % mesh.axis_size(axis) == 0:
                specs = ["unsharded"] * len(v.shape)
                specs[dim] = axis
                lay = sgdgen.Layout(specs, mesh)
                if not lay.named_sharding().is_equivalent_to(want, len(v.shape)):
                    return lay
    return None


def test_bad_gradients_are_refused_naming_the_variable_with_nothing_changed(
        capsys: pytest.CaptureFixture[str]) -> None:
    @SETTINGS
    @given(config=configs(), model=models([np.float32]), seed=st.integers(0, 2**16),
           kind=st.sampled_from(BAD), data=st.data())
    def check(config: dict[str, Any], model: Any, seed: int, kind: str, data: Any) -> None:
        mesh, spec = model
        opt, variables = _build(mesh, spec, config, seed)
        opt.apply_gradients([(np.ones(v.shape, v.dtype), v) for v in variables])  # compiled, slots non-trivial
        victim = data.draw(st.integers(0, len(variables) - 1))
        bad = _bad_gradient(kind, variables[victim], mesh)
        if bad is None:
            return  # no other layout exists for this shape on this mesh (e.g. one device)
        grads = [bad if k == victim else np.ones(v.shape, v.dtype) for k, v in enumerate(variables)]
        before = [x.numpy().tobytes() for x in [*opt.variables, *variables]]
        with pytest.raises((SgdgenError, ValueError, TypeError)) as info:
            opt.apply_gradients(zip(grads, variables))
        assert repr(variables[victim].name.removesuffix(":0")) in str(info.value) or \
            repr(variables[victim].name) in str(info.value), f"{kind}: {info.value}"
        assert [x.numpy().tobytes() for x in [*opt.variables, *variables]] == before, kind
        opt.apply_gradients([(np.ones(v.shape, v.dtype), v) for v in variables])  # still usable

    _run_property(check, capsys, "bad inputs (" + ", ".join(BAD) + ")")


@pytest.mark.parametrize("mesh", [MESHES[0], MESHES[2]], ids=["one_device", "2x4"])
def test_clipnorm_over_variables_of_two_dtypes(mesh: sgdgen.Mesh) -> None:
    """Found by the 16-bit property: clipnorm's norm partials are f32 for a 16-bit variable and f64
    for a float32 one; sgd-fuse-step packed them into one vector of the first one's type, which
    did not verify. Pinned here on one device and across the mesh's all_reduce."""
    spec = [("half", (), np.float16, []), ("full", (8, 4), np.float32, ["batch", "model"] if mesh.size > 1 else
                                                                   ["unsharded", "unsharded"]),
            ("brain", (4,), ml_dtypes.bfloat16, ["model"] if mesh.size > 1 else ["unsharded"])]
    config = {"learning_rate": 0.1, "momentum": 0.9, "clipnorm": 0.1}
    opt, variables = _build(mesh, spec, config, seed=4)
    ref = reference.build(opt.config, [v.numpy() for v in variables])
    grads = [np.full(v.shape, 3, v.dtype) for v in variables]  # every norm above the threshold: all clip
    opt.apply_gradients(zip(grads, variables))
    ref = reference.apply_gradients(opt.config, ref, grads)
    _compare(opt, variables, ref, f"clipnorm over float16, float32 and bfloat16 on {mesh or 'one device'}")


HYPERPARAMETERS = ["learning_rate", "momentum", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm",
                   "ema_momentum"]
#: rounded to float32 before they reach the program (tf_keras' float32 cast), so 1e39 is inf there
FLOAT32_HYPERPARAMETERS = ("learning_rate", "momentum", "weight_decay")


def test_non_finite_hyperparameters_are_refused_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    """NaN, +-Inf and 1e39 (inf in float32) for any hyperparameter, at construction and through the
    `learning_rate` setter: refused naming the field; a refused setter leaves the rate as it was."""
    @SETTINGS
    @given(field=st.sampled_from(HYPERPARAMETERS), value=st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                          1e39]), config=configs())
    def check(field: str, value: float, config: dict[str, Any]) -> None:
        if value == 1e39 and field not in FLOAT32_HYPERPARAMETERS:
            value = float("nan")  # a clip of 1e39 is finite for a float64 variable: only the float32 ones overflow
        kw = {k: v for k, v in config.items() if k not in ("clipnorm", "clipvalue", "global_clipnorm")}
        kw[field] = value
        if field == "ema_momentum":
            kw["use_ema"] = True
        with pytest.raises((SgdgenError, ValueError, TypeError)) as info:
            sgdgen.SGD(**kw)
        assert field in str(info.value), info.value
        opt = sgdgen.SGD(learning_rate=0.1)
        if field == "learning_rate":
            with pytest.raises((SgdgenError, ValueError, TypeError)):
                opt.learning_rate = value
            assert float(opt.learning_rate) == np.float32(0.1)

    _run_property(check, capsys, "non-finite hyperparameters")


@pytest.fixture(scope="module")
def saved_artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    variables = [sgdgen.Variable(np.ones(s, np.float32), layout=sgdgen.Layout(l, mesh), name=n) for n, s, l in BASE]
    opt = sgdgen.SGD(0.1, momentum=0.9, mesh=mesh)
    opt.build(variables)
    return mesh, opt.save_artifact(tmp_path_factory.mktemp("mismatch") / "step.sgd", platforms=())


BASE = [("dense/kernel", (8, 4), ["unsharded", "model"]), ("dense/bias", (4,), ["model"]),
        ("emb", (6, 2), ["unsharded", "unsharded"])]


@pytest.mark.parametrize("change", ["shape", "dtype", "layout"])
@pytest.mark.parametrize("victim", range(len(BASE)), ids=[n for n, _, _ in BASE])
def test_mismatched_artifacts_are_refused_naming_the_variable(saved_artifact: Any, victim: int, change: str) -> None:
    """An artifact loaded onto variables that differ from the ones it was compiled for (one variable's
    shape, dtype or layout changed; every such case, so no sampling) is refused naming that variable,
    and the given variables stay bit-identical."""
    from sgdgen.errors import ArtifactError

    mesh, path = saved_artifact
    given_vars = []
    for k, (name, shape, layout) in enumerate(BASE):
        dtype = np.float32
        if k == victim and change == "shape":
            shape = (shape[0] * 2, *shape[1:])
        if k == victim and change == "dtype":
            dtype = np.float64
        if k == victim and change == "layout":
            layout = ["batch", *layout[1:]] if layout[0] != "batch" else ["unsharded"] * len(shape)
        given_vars.append(sgdgen.Variable(np.full(shape, 2.0, dtype), layout=sgdgen.Layout(layout, mesh), name=name))
    before = [v.numpy().tobytes() for v in given_vars]
    with pytest.raises(ArtifactError) as info:
        sgdgen.SGD.load_artifact(path, given_vars)
    assert BASE[victim][0] in str(info.value), info.value
    assert [v.numpy().tobytes() for v in given_vars] == before
