"""jax.export: the step (and a whole train step using it) serialized, then deserialized and run by
a fresh process that never imports sgdgen, eagerly and inside its own jit, with the same values."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sgdgen
from sgdgen.codegen.abi import StepState
from sgdgen.errors import ArtifactError
from sgdgen.io.export import argument_specs, export_step
from sgdgen.runtime import primitive

CONSUMER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax

    out = {}
    data = np.load(sys.argv[1])
    for name in sys.argv[2:]:
        exported = jax.export.deserialize(open(f"{name}.jaxexport", "rb").read())
        axes = tuple(data[f"{name}_axes"])
        shape = tuple(int(n) for n in data[f"{name}_shape"])
        devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
        mesh = jax.sharding.Mesh(devices, axes)
        flat = [jax.device_put(data[f"{name}_arg{k}"], s) for k, s in enumerate(exported.in_shardings_jax(mesh))]
        args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, flat)
        eager = jax.tree_util.tree_leaves(exported.call(*args, **kwargs))
        jitted = jax.tree_util.tree_leaves(jax.jit(exported.call)(*args, **kwargs))
        texts = jax.jit(exported.call).lower(*args, **kwargs).compile().as_text()
        out[f"{name}_modules"] = np.int64(texts.count("HloModule"))
        for k, (a, b) in enumerate(zip(eager, jitted)):
            out[f"{name}_eager{k}"] = np.asarray(a)
            out[f"{name}_jit{k}"] = np.asarray(b)
    assert not any(m == "sgdgen" or m.startswith("sgdgen.") for m in sys.modules), "sgdgen was imported"
    np.savez(sys.argv[1] + ".out.npz", **out)
""")


def _mesh(kind: str) -> jax.sharding.Mesh:
    if kind == "1":
        return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1), ("x",))
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("batch", "model"))


def _params(mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    model = "model" if "model" in mesh.axis_names else None
    return {"kernel": jax.device_put(rng.standard_normal((8, 4), np.float32), NamedSharding(mesh, P(None, model))),
            "bias": jax.device_put(rng.standard_normal(4).astype(np.float32), NamedSharding(mesh, P()))}


def _run_consumer(tmp_path, names: list[str], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    (tmp_path / "consumer.py").write_text(CONSUMER)
    np.savez(tmp_path / "data.npz", **data)
    proc = subprocess.run([sys.executable, "consumer.py", "data.npz", *names], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(tmp_path / "data.npz.out.npz"))


@pytest.mark.parametrize("kind", ["1", "2x4"])
def test_exported_step_and_train_step_run_without_sgdgen(kind: str, tmp_path) -> None:
    mesh = _mesh(kind)
    params = _params(mesh)
    step = sgdgen.jax_step(dict(learning_rate=0.1, momentum=0.9, global_clipnorm=1.0), params)
    state = step.init(params)
    grads = jax.tree_util.tree_map(lambda p: p * 0.25, params)
    data: dict[str, np.ndarray] = {}

    # 1. the step alone (StepABI order), exported for three platforms, run on this one
    blob = export_step(step.program, ("cpu", "cuda", "tpu"))
    (tmp_path / "step.jaxexport").write_bytes(blob)
    args = step.abi.pack(state, jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(grads), 0.1)
    want_step = primitive.apply(step.program, args)  # the results in StepABI order, in this process

    # 2. a whole train step of the user's, exported with jax.export; the state crosses the boundary
    # as a plain tuple (a StepState node would need sgdgen's type registered in the consumer)
    x = jax.device_put(np.random.default_rng(1).standard_normal((4, 8), np.float32), NamedSharding(mesh, P()))

    def train(params, state, x, lr):
        grads = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["kernel"] + p["bias"]) ** 2))(params)
        new_params, new_state = step(params, grads, StepState(*state), lr)
        return new_params, tuple(new_state)

    exported = jax.export.export(jax.jit(train))(params, tuple(state), x, 0.1)
    (tmp_path / "train.jaxexport").write_bytes(exported.serialize())
    train_args = jax.tree_util.tree_leaves((params, tuple(state), x, np.float32(0.1)))
    want_train = jax.tree_util.tree_leaves(jax.jit(train)(params, tuple(state), x, 0.1))

    for name, flat in (("step", args), ("train", train_args)):
        data[f"{name}_axes"] = np.array(mesh.axis_names)
        data[f"{name}_shape"] = np.array(mesh.devices.shape)
        for k, a in enumerate(flat):
            data[f"{name}_arg{k}"] = np.asarray(a)
    got = _run_consumer(tmp_path, ["step", "train"], data)
    for name, want in (("step", want_step), ("train", want_train)):
        assert int(got[f"{name}_modules"]) == 1
        for k, w in enumerate(want):
            np.testing.assert_array_equal(got[f"{name}_eager{k}"], np.asarray(w), err_msg=f"{name} result {k}")
            np.testing.assert_array_equal(got[f"{name}_jit{k}"], np.asarray(w), err_msg=f"{name} result {k} (jit)")


def test_argument_specs_follow_the_abi_and_unknown_platforms_are_refused() -> None:
    params = _params(_mesh("2x4"))
    step = sgdgen.jax_step(dict(learning_rate=0.1), params)
    specs = argument_specs(step.program)
    assert [tuple(s.shape) for s in specs] == [tuple(s.shape) for s in step.abi.inputs]
    assert specs[0].dtype == jnp.int32  # iterations at the exporter's width (x64 off)
    assert specs[2].sharding.spec == P(None, "model")  # "kernel" (leaves sorted: bias, kernel)
    with pytest.raises(ArtifactError, match="cpu,cuda,tpu"):
        export_step(step.program, ("gpu",))
