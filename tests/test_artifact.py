"""Artifact directories (sgdgen.io.artifact): what is written, what a load verifies and refuses,
the rebuild from step.mlirbc, SGD.save_artifact / load_artifact, and the persistent
compilation cache seen from a second process.

Every test writes under tmp_path and points the persistent compilation cache at a
temporary directory, so nothing depends on (or writes to) ~/.cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import sgdgen
from sgdgen.io import artifact
from sgdgen.runtime import program as program_mod
from sgdgen.io.artifact import SCHEMA_VERSION, ArtifactError
from sgdgen.frontend.config import SGDConfig
from sgdgen.runtime.program import STATS, StepProgram
from sgdgen.runtime.executable import StepExecutable
from sgdgen.frontend.spec import Mesh, VarSpec

MESH = Mesh.parse("batch=2,model=4")
CONFIG = SGDConfig.create(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, global_clipnorm=1.0,
                          use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
#: Mixed layouts: sharded on one axis, replicated (and excluded from decay), sharded on two
#: axes over two dimensions, two axes on one dimension, a scalar.
VARS = (
    VarSpec.create("dense/kernel", [8, 16], "float32", MESH, ["unsharded", "model"]),
    VarSpec.create("dense/bias", [16], "float32", MESH, None, decay=False),
    VarSpec.create("proj", [4, 8], "float32", MESH, ["batch", "model"]),
    VarSpec.create("embed", [16, 2], "float32", MESH, [("batch", "model"), "unsharded"]),
    VarSpec.create("scale", [], "float32", MESH),
)
STEPS = 5


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def xla_cache(private_xla_cache: Path) -> Path:
    return private_xla_cache


@pytest.fixture(scope="module")
def prog() -> StepProgram:
    return StepProgram(CONFIG, VARS, MESH)


@pytest.fixture(scope="module")
def written(prog: StepProgram, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact of `prog`, written once; tests that edit it work on a copy."""
    return artifact.write(prog, tmp_path_factory.mktemp("art") / "step")


@pytest.fixture
def art_copy(written: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(written, dst)
    return dst


@pytest.fixture(scope="module")
def fresh_result(prog: StepProgram) -> list[np.ndarray]:
    """STEPS steps of the program compiled afresh in this process (no artifact, no cache involved)."""
    return run_steps(StepExecutable.compile(prog.lowered_text, prog.abi, prog.mesh))


# ---- helpers ----------------------------------------------------------------------------


def run_steps(step: StepExecutable, steps: int = STEPS, seed: int = 0) -> list[np.ndarray]:
    """Runs `steps` steps from a seeded initial state with seeded gradients; the final state on the host."""
    abi = step.abi
    rng = np.random.default_rng(seed)
    nvars = len([s for s in abi.outputs if s.role == "variable"])
    init = {}
    for s in abi.outputs:
        if s.role == "variable":
            init[s.var] = rng.standard_normal(s.shape).astype(np.float32)
    host = []
    for s in abi.outputs:
        if s.role == "iterations":
            host.append(np.int64(0))
        elif s.role == "momentum":
            host.append(np.zeros(s.shape, np.float32))
        else:  # variable, average (EMA starts at a copy of the variable)
            host.append(init[s.var].copy())
    state = [step.put(s, h) for s, h in zip(abi.outputs, host)]
    for _ in range(steps):
        args = list(state)
        for i in range(nvars):
            slot = abi.inputs[abi.index("gradient", i)]
            args.append(step.put(slot, rng.standard_normal(slot.shape).astype(np.float32)))
        if any(s.role == "learning_rate" for s in abi.inputs):
            args.append(step.put(abi.inputs[abi.index("learning_rate")], np.float32(0.1)))
        state = step(args)
    return [np.asarray(a) for a in state]


def assert_same_state(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg=f"state slot {k}")  # bit-identical, not close


def manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    (path / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    k = int(len(data) * at)
    data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def executable_file(path: Path) -> Path:
    (entry,) = manifest(path)["executables"].values()
    return path / entry["file"]


def refused(path: Path, *, mesh: Any = None, variables: Any = None) -> str:
    with pytest.raises(ArtifactError) as info:
        artifact.read(path, mesh=mesh, variables=variables)
    return str(info.value)


# ---- round trip -------------------------------------------------------------------------


def test_files_and_hashes(written: Path) -> None:
    m = manifest(written)
    names = set(m["files"])
    assert {"step.mlir", "step.mlirbc"} <= names
    (platform,) = m["executables"]
    assert platform == jax.devices()[0].platform
    assert m["executables"][platform]["file"] in names
    on_disk = {p.name for p in written.iterdir()}
    assert on_disk == names | {"manifest.json"}  # every file is listed, nothing else is there
    for name, digest in m["files"].items():
        assert sha256(written / name) == digest, name


def test_manifest_fields(written: Path, prog: StepProgram) -> None:
    import jaxlib
    from jaxlib.mlir.dialects import stablehlo

    m = manifest(written)
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["sgdgen_version"] == sgdgen.__version__
    assert m["stablehlo_target_version"] == stablehlo.get_current_version()
    assert m["config"] == CONFIG.get_config()
    assert m["mesh"] == {"axes": [["batch", 2], ["model", 4]], "device_ids": list(range(8))}
    assert m["variables"] == json.loads(json.dumps([v.to_json() for v in VARS]))
    assert m["variables"][1]["decay"] is False
    assert m["variables"][3]["layout"] == [["batch", "model"], "unsharded"]
    abi = m["abi"]
    assert set(abi) >= {"inputs", "outputs", "aliases"}
    assert abi == json.loads(json.dumps(prog.abi.to_json()))
    n = len(VARS)
    roles = [s["role"] for s in abi["inputs"]]
    assert roles == ["iterations"] + ["variable"] * n + ["momentum"] * n + ["average"] * n + ["gradient"] * n + [
        "learning_rate"]
    assert [s["role"] for s in abi["outputs"]] == roles[: 1 + 3 * n]
    assert abi["aliases"] == {str(k): k for k in range(1 + 3 * n)}
    assert abi["inputs"][1] == {"role": "variable", "var": 0, "name": "dense/kernel", "shape": [8, 16],
                                "dtype": "float32", "layout": ["unsharded", "model"]}
    (entry,) = m["executables"].values()
    assert entry["jaxlib"] == jaxlib.__version__


def _deserialized(path: Path) -> str:
    from jaxlib.mlir.dialects import stablehlo

    from sgdgen.codegen.ir import make_context

    ctx = make_context()
    with ctx:
        return str(stablehlo.deserialize_portable_artifact(ctx, (path / "step.mlirbc").read_bytes()))


# StableHLO's portable form (VHLO) stores an all_reduce's channel as a bare `channel_id`
# integer and reads it back with type = 0, so step.mlir (type = 1, DEVICE_TO_DEVICE) and the
# module in step.mlirbc differ in that one attribute.
_CHANNEL_TYPE = re.compile(r"(#stablehlo\.channel_handle<handle = \d+), type = \d+>")


def test_mlirbc_is_the_same_module_up_to_channel_type(written: Path) -> None:
    text = (written / "step.mlir").read_text()
    back = _deserialized(written)
    assert "stablehlo.all_reduce" in back and "sdy.manual_computation" in back
    assert _CHANNEL_TYPE.sub(r"\1>", back) == _CHANNEL_TYPE.sub(r"\1>", text)


def test_load_runs_the_same_numbers(written: Path, fresh_result: list[np.ndarray]) -> None:
    art = artifact.read(written, mesh=MESH, variables=list(VARS))
    assert art.program.variables == VARS and art.program.mesh == MESH
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same platform and jaxlib: the stored executable, no rebuild warning
        step = art.executable()
    assert_same_state(run_steps(step), fresh_result)


def test_write_without_executable(prog: StepProgram, tmp_path: Path, fresh_result: list[np.ndarray]) -> None:
    out = artifact.write(prog, tmp_path / "noexe", executable=False)
    m = manifest(out)
    assert m["executables"] == {} and set(m["files"]) == {"step.mlir", "step.mlirbc"}
    art = artifact.read(out)
    with pytest.warns(UserWarning, match=r"no executable for .*step\.mlirbc"):
        step = art.executable()
    assert_same_state(run_steps(step), fresh_result)


# ---- refusals ---------------------------------------------------------------------------


def test_refuses_corrupt_mlirbc(art_copy: Path) -> None:
    flip_byte(art_copy / "step.mlirbc")
    msg = refused(art_copy)
    assert "step.mlirbc" in msg and "sha256" in msg and "rewrite the artifact" in msg


def test_refuses_corrupt_executable(art_copy: Path) -> None:
    exe = executable_file(art_copy)
    flip_byte(exe)
    msg = refused(art_copy)
    assert exe.name in msg and "sha256" in msg and "rewrite the artifact" in msg


def test_refuses_corrupt_step_mlir(art_copy: Path) -> None:
    with open(art_copy / "step.mlir", "a") as f:
        f.write("\n")
    msg = refused(art_copy)
    assert "step.mlir " in msg and "sha256" in msg and "rewrite" in msg


@pytest.mark.parametrize("name", ["step.mlir", "step.mlirbc", "executable"])
def test_refuses_missing_file(art_copy: Path, name: str) -> None:
    f = executable_file(art_copy) if name == "executable" else art_copy / name
    f.unlink()
    msg = refused(art_copy)
    assert f"{f.name} is missing" in msg and "rewrite" in msg


def test_refuses_manifest_without_step_files(art_copy: Path) -> None:
    m = manifest(art_copy)
    del m["files"]["step.mlirbc"]
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "lists no step.mlirbc" in msg and "rewrite" in msg


def test_refuses_bad_json_manifest(art_copy: Path) -> None:
    (art_copy / "manifest.json").write_text('{"schema_version": 1,')
    msg = refused(art_copy)
    assert "manifest.json" in msg and "corrupt manifest" in msg and "rewrite" in msg


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1, "1", None])
def test_refuses_schema_out_of_range(art_copy: Path, version: Any) -> None:
    m = manifest(art_copy)
    m["schema_version"] = version
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert f"schema version {version!r}" in msg
    assert f"1..{SCHEMA_VERSION}" in msg and "recompile" in msg


def test_refuses_invalid_manifest_field(art_copy: Path) -> None:
    m = manifest(art_copy)
    m["variables"][0]["layout"] = ["unsharded", "nope"]
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "manifest field is invalid" in msg and "nope" in msg and "rewrite" in msg


def test_refuses_missing_manifest_field(art_copy: Path) -> None:
    m = manifest(art_copy)
    del m["mesh"]
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "manifest field is invalid" in msg and "mesh" in msg


@pytest.mark.parametrize("mesh", [
    Mesh.parse("batch=4,model=2"),
    Mesh.parse("x=8"),
    Mesh((("batch", 2), ("model", 4)), device_ids=[7, 6, 5, 4, 3, 2, 1, 0]),
], ids=["other-shape", "other-axes", "other-devices"])
def test_refuses_other_mesh(written: Path, mesh: Mesh) -> None:
    msg = refused(written, mesh=mesh)
    assert "batch=2,model=4" in msg and str(mesh) in msg
    assert str(list(mesh.device_ids)) in msg
    assert "recompile for this mesh" in msg


def test_accepts_same_mesh_in_any_form(written: Path) -> None:
    for m in (MESH, "batch=2,model=4", {"batch": 2, "model": 4}):
        assert artifact.read(written, mesh=m).program.mesh == MESH


def _replace(k: int, **kw: Any) -> list[VarSpec]:
    specs = list(VARS)
    v = specs[k]
    fields = dict(name=v.name, shape=v.shape, dtype=v.dtype, layout=v.layout.sharding_specs, decay=v.decay)
    fields.update(kw)
    specs[k] = VarSpec.create(fields["name"], fields["shape"], fields["dtype"], MESH, fields["layout"],
                              fields["decay"])
    return specs


VARIABLE_MISMATCHES: dict[str, tuple[Callable[[], list[VarSpec]], list[str]]] = {
    "shape": (lambda: _replace(0, shape=[8, 32]), ["variable 0", "'dense/kernel'", "shape (8, 32)", "(8, 16)"]),
    "dtype": (lambda: _replace(2, dtype="bfloat16"), ["variable 2", "'proj'", "dtype 'bfloat16'", "'float32'"]),
    "layout": (lambda: _replace(0, layout=["model", "unsharded"]),
               ["'dense/kernel'", "['model', 'unsharded']", "['unsharded', 'model']", "relayout"]),
    "layout-two-axes": (lambda: _replace(3, layout=[("model", "batch"), "unsharded"]),
                        ["'embed'", "('model', 'batch')", "('batch', 'model')"]),
    "name": (lambda: _replace(1, name="dense/b"), ["variable 1", "name 'dense/b'", "'dense/bias'"]),
    "decay": (lambda: _replace(1, decay=True), ["variable 1", "decay True", "False"]),
    "fewer": (lambda: list(VARS[:-1]), ["compiled for 5 variables, 4 given"]),
    "more": (lambda: [*VARS, VarSpec.create("extra", [4], "float32", MESH)], ["compiled for 5 variables, 6 given"]),
}


@pytest.mark.parametrize("case", list(VARIABLE_MISMATCHES))
def test_refuses_other_variables(written: Path, case: str) -> None:
    make, expected = VARIABLE_MISMATCHES[case]
    msg = refused(written, mesh=MESH, variables=make())
    for piece in expected:
        assert piece in msg, (piece, msg)
    assert "recompile" in msg


def test_refuses_stale_artifact(art_copy: Path) -> None:
    """step.mlir edited and its hash fixed: only the staleness check can see it."""
    mlir = art_copy / "step.mlir"
    text = mlir.read_text()
    edited = text.replace("sgdgen.version = \"0.1.0\"", "sgdgen.version = \"0.0.9\"", 1)
    if edited == text:
        edited = text.replace("stablehlo.add", "stablehlo.subtract", 1)
    assert edited != text
    mlir.write_text(edited)
    m = manifest(art_copy)
    m["files"]["step.mlir"] = sha256(mlir)
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "step.mlir differs" in msg and "stale" in msg and "recompile" in msg


def test_refuses_stale_config(art_copy: Path) -> None:
    """The manifest's config edited: the regenerated module no longer matches step.mlir."""
    m = manifest(art_copy)
    m["config"]["momentum"] = 0.5
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "stale" in msg and "recompile" in msg


def test_refuses_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "step.mlir").write_text("module {}\n")
    for d in (tmp_path / "empty", tmp_path / "does-not-exist"):
        msg = refused(d)
        assert "no manifest.json" in msg and "not an sgdgen artifact" in msg
        assert "sgdgen compile" in msg and "save_artifact" in msg


# ---- another platform or jaxlib -----------------------------------------------------------


@pytest.mark.parametrize("field,value", [("jaxlib", "0.0.1"), ("platform_version", "some other cpu")])
def test_other_jaxlib_rebuilds_from_mlirbc(art_copy: Path, field: str, value: str,
                                           fresh_result: list[np.ndarray]) -> None:
    m = manifest(art_copy)
    (entry,) = m["executables"].values()
    entry[field] = value
    write_manifest(art_copy, m)
    art = artifact.read(art_copy, mesh=MESH, variables=list(VARS))
    with pytest.warns(UserWarning, match=r"step\.mlirbc") as record:
        step = art.executable()
    assert value in str(record[0].message)
    assert_same_state(run_steps(step), fresh_result)


def test_other_platform_rebuilds_from_mlirbc(art_copy: Path, fresh_result: list[np.ndarray]) -> None:
    m = manifest(art_copy)
    (platform,) = m["executables"]
    m["executables"] = {"tpu": {**m["executables"][platform], "platform": "tpu", "platform_version": "TFRT TPU"}}
    write_manifest(art_copy, m)
    art = artifact.read(art_copy)
    with pytest.warns(UserWarning, match=rf"no executable for {platform}.*step\.mlirbc"):
        step = art.executable()
    assert_same_state(run_steps(step), fresh_result)


# ---- SGD.save_artifact / SGD.load_artifact -------------------------------------------------


LAYOUTS = {"dense/kernel": ["unsharded", "model"], "dense/bias": ["unsharded"], "proj": ["batch", "model"]}
SHAPES = {"dense/kernel": (8, 16), "dense/bias": (16,), "proj": (4, 8)}


def _variables(values: dict[str, np.ndarray], layouts: dict[str, Any] = LAYOUTS) -> list[sgdgen.Variable]:
    return [sgdgen.Variable(values[k], layout=sgdgen.Layout(layouts[k], MESH), name=k) for k in values]


def _grads(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES.values()]


def _optimizer() -> sgdgen.SGD:
    opt = sgdgen.SGD(learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, global_clipnorm=1.0,
                     use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3, mesh=MESH)
    opt.exclude_from_weight_decay(var_names=["bias"])
    return opt


def test_sgd_save_and_load_artifact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    v1 = _variables(init)
    opt1 = _optimizer()
    for _ in range(2):
        opt1.apply_gradients(zip(_grads(rng), v1))
    out = opt1.save_artifact(tmp_path / "opt")
    m = manifest(Path(out))
    assert [v["name"] for v in m["variables"]] == list(SHAPES)
    assert m["variables"][1].get("decay") is False  # the exclusion is part of the artifact

    # Fresh variables holding opt1's current values; the loaded optimizer takes opt1's state.
    v2 = _variables({v._shared_name: v.numpy() for v in v1})
    program_mod.clear_memory_cache()
    before = (STATS.compiles, STATS.disk_hits)
    opt2 = sgdgen.SGD.load_artifact(out, v2)
    assert opt2.get_config() == opt1.get_config()
    assert opt2.mesh == MESH
    opt2.set_weights(opt1.get_weights())
    for _ in range(3):
        g = _grads(rng)
        opt1.apply_gradients(zip(g, v1))
        opt2.apply_gradients(zip([x.copy() for x in g], v2))
    # The loaded executable served both optimizers: nothing compiled or read from the cache.
    assert (STATS.compiles, STATS.disk_hits) == before
    assert int(opt2.iterations.numpy()) == int(opt1.iterations.numpy()) == 5
    for a, b in zip(v1, v2):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
        assert b.value.sharding.is_equivalent_to(a.value.sharding, a.value.ndim)
    for a, b in zip(opt1.get_weights(), opt2.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_sgd_load_artifact_refuses_other_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    opt = _optimizer()
    opt.build(_variables(init))
    out = opt.save_artifact(tmp_path / "opt")
    other = dict(LAYOUTS, proj=["model", "batch"])
    with pytest.raises(ArtifactError, match=r"'proj'.*\['model', 'batch'\].*\['batch', 'model'\].*recompile"):
        sgdgen.SGD.load_artifact(out, _variables(init, other))
    with pytest.raises(ArtifactError, match="compiled for 3 variables, 2 given"):
        sgdgen.SGD.load_artifact(out, _variables(init)[:2])
    with pytest.raises(ArtifactError, match="recompile for this mesh"):
        sgdgen.SGD.load_artifact(out, _variables(init), mesh="batch=4,model=2")


def test_save_artifact_needs_a_built_optimizer(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="build"):
        _optimizer().save_artifact(tmp_path / "x")


# ---- a second process loads instead of compiling ------------------------------------------


_CHILD = textwrap.dedent("""
    import json
    import numpy as np
    import sgdgen
    from sgdgen.runtime.program import STATS

    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    w = sgdgen.Variable(np.arange(32, dtype=np.float32).reshape(4, 8), name="w",
                        layout=sgdgen.Layout(["unsharded", "model"], mesh))
    b = sgdgen.Variable(np.ones(8, np.float32), name="b", layout=sgdgen.Layout(["batch"], mesh))
    opt = sgdgen.SGD(learning_rate=0.1, momentum=0.9, global_clipnorm=1.0, mesh=mesh)
    for k in range(2):
        opt.apply_gradients([(np.full((4, 8), k + 1.0, np.float32), w), (np.ones(8, np.float32), b)])
    print(json.dumps({"compiles": STATS.compiles, "disk_hits": STATS.disk_hits,
                      "memory_hits": STATS.memory_hits, "w": w.numpy().tolist(), "b": b.numpy().tolist()}))
""")


def _child(cache: Path, cwd: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               SGDGEN_CACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="1")
    r = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_persistent_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _child(cache, tmp_path)
    assert first["compiles"] == 1 and first["disk_hits"] == 0 and first["memory_hits"] >= 1
    assert any(p.is_file() for p in cache.rglob("*")), "the first process wrote nothing to the cache"
    second = _child(cache, tmp_path)
    assert second["disk_hits"] >= 1 and second["compiles"] == 0
    assert second["w"] == first["w"] and second["b"] == first["b"]
