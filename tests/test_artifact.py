"""Artifact directories (sgdgen.io.artifact): what is written, what a load verifies and refuses,
the rebuild from step.mlirbc, SGD.save_artifact / load_artifact, and the persistent
compilation cache seen from a second process.

Every test writes under tmp_path and points the persistent compilation cache at a
temporary directory, so nothing depends on (or writes to) ~/.cache.
"""

from __future__ import annotations

import errno
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
from sgdgen.runtime.cache import default_cache
from sgdgen.io.artifact import ArtifactError
from sgdgen.io.manifest import (CALLING_CONVENTION_VERSION, FORMAT_VERSION, MIN_CALLING_CONVENTION_VERSION,
                                MIN_FORMAT_VERSION)
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
#: An artifact written by the sgdgen of commit c68b516 (format 1; see tests/data/README.md).
FORMAT1 = Path(__file__).parent / "data" / "format1-c68b516"


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
    assert m["format_version"] == FORMAT_VERSION and "schema_version" not in m
    assert m["calling_convention_version"] == CALLING_CONVENTION_VERSION
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
    # The executable is bound to step.mlir + the description above + the compile options.
    bound = artifact.binding((written / "step.mlir").read_bytes(), artifact.read(written).manifest)
    assert m["binding"] == bound
    assert entry["fingerprint"] == artifact.fingerprint(bound, entry["compile_options"])
    assert entry["compile_options"]["device_ids"] == list(MESH.device_ids)
    assert entry["compile_options"]["num_partitions"] == MESH.size


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
    assert m["executables"] == {} and set(m["files"]) == {"step.mlir", "step.mlirbc", "step.jaxexport"}
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
    assert "names step.mlirbc but lists no sha256" in msg and "rewrite" in msg


def test_refuses_bad_json_manifest(art_copy: Path) -> None:
    (art_copy / "manifest.json").write_text('{"schema_version": 1,')
    msg = refused(art_copy)
    assert "manifest.json" in msg and "corrupt manifest" in msg and "rewrite" in msg


@pytest.mark.parametrize("field,label,window,version", [
    *[("format_version", "format", (MIN_FORMAT_VERSION, FORMAT_VERSION), v)
      for v in (0, FORMAT_VERSION + 1, "2", None, True, 2.0)],
    *[("calling_convention_version", "calling-convention", (MIN_CALLING_CONVENTION_VERSION, CALLING_CONVENTION_VERSION), v)
      for v in (0, CALLING_CONVENTION_VERSION + 1, True, "1")],
])
def test_refuses_versions_out_of_range(art_copy: Path, field: str, label: str, window: tuple[int, int],
                                       version: Any) -> None:
    m = manifest(art_copy)
    m[field] = version
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert f"{label} version {version!r}" in msg
    assert f"{window[0]}..{window[1]}" in msg and "recompile" in msg


def test_format1_schema_version_true_is_not_1(tmp_path: Path) -> None:
    """issue 16 item 8: `schema_version: true` (format 1's key) must not read as 1."""
    old = tmp_path / "old"
    shutil.copytree(FORMAT1, old)
    m = manifest(old)
    m["schema_version"] = True
    write_manifest(old, m)
    msg = refused(old)
    assert "format version True" in msg and f"{MIN_FORMAT_VERSION}..{FORMAT_VERSION}" in msg


@pytest.mark.parametrize("field,value,expected", [
    ("sgdgen_version", 1, "'sgdgen_version' must be str"),
    ("config", [], "'config' must be dict"),
    ("variables", {}, "'variables' must be list"),
    ("binding", "abc", "binding must be a sha256"),
    ("files", {"step.mlir": 5}, "files['step.mlir'] must be a sha256"),
])
def test_refuses_mistyped_manifest_field(art_copy: Path, field: str, value: Any, expected: str) -> None:
    m = manifest(art_copy)
    m[field] = value
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert expected in msg and "rewrite" in msg, msg


def test_manifest_json_round_trip(written: Path) -> None:
    from sgdgen.io.manifest import Manifest

    m = manifest(written)
    typed = Manifest.from_json(m, "x")
    assert typed.to_json() == m
    assert Manifest.from_json(json.loads(typed.dumps()), "x") == typed


def test_refuses_a_file_the_manifest_names_but_does_not_hash(art_copy: Path) -> None:
    """issue 16 item 2: an executable named in `executables` must also be hashed in `files`."""
    m = manifest(art_copy)
    (entry,) = m["executables"].values()
    del m["files"][entry["file"]]
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert f"names {entry['file']} but lists no sha256" in msg


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
    assert "manifest field 'mesh' is missing" in msg and "rewrite" in msg


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


def test_refuses_an_edited_module(art_copy: Path) -> None:
    """step.mlir edited and its hash fixed: the binding to the manifest's description (and so
    to the executable) no longer holds."""
    mlir = art_copy / "step.mlir"
    text = mlir.read_text()
    edited = text.replace("stablehlo.add", "stablehlo.subtract", 1)
    assert edited != text
    mlir.write_text(edited)
    m = manifest(art_copy)
    m["files"]["step.mlir"] = sha256(mlir)
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "step.mlir and the manifest's config" in msg and "edited" in msg and "rewrite" in msg


def test_refuses_an_edited_config(art_copy: Path) -> None:
    """The manifest's config edited: a momentum-0.5 optimizer must not run a momentum-0.9 module."""
    m = manifest(art_copy)
    m["config"]["momentum"] = 0.5
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "edited" in msg and "rewrite" in msg


def test_refuses_a_recorded_abi_the_variables_do_not_give(art_copy: Path) -> None:
    m = manifest(art_copy)
    m["abi"]["inputs"][1]["name"] = "renamed"
    m["binding"] = artifact.binding((art_copy / "step.mlir").read_bytes(), artifact.Manifest.from_json(m, "x"))
    (entry,) = m["executables"].values()
    entry["fingerprint"] = artifact.fingerprint(m["binding"], entry["compile_options"])
    write_manifest(art_copy, m)
    msg = refused(art_copy)
    assert "recorded ABI's inputs[1]" in msg and "'renamed'" in msg and "recompile" in msg


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
    default_cache().clear()
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


# ---- artifacts outlive the sgdgen that wrote them ----------------------------------------


def _format1_variables() -> list[sgdgen.Variable]:
    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    return [sgdgen.Variable(np.arange(32, dtype=np.float32).reshape(4, 8) / 10, name="dense/kernel",
                            layout=sgdgen.Layout(["unsharded", "model"], mesh)),
            sgdgen.Variable(np.ones(8, np.float32), name="dense/bias", layout=sgdgen.Layout(["batch"], mesh))]


def test_format1_artifact_from_the_previous_commit_loads_and_steps() -> None:
    """The artifact c68b516 wrote: read by version (format 1 is in the window), its module and
    recorded ABI trusted; its executable (not bound to a module in format 1) is rebuilt from
    step.mlirbc. Three steps agree with sgdgen.reference to the numerics tests' bound
    (tests/support/stepdriver.assert_matches: 1e-6 of max|ref| per slot, SEMANTICS 10/12)."""
    from sgdgen import reference

    assert manifest(FORMAT1)["schema_version"] == 1  # the data really is format 1
    variables = _format1_variables()
    init = [v.numpy() for v in variables]
    with pytest.warns(UserWarning, match=r"format 1.*not bound.*step\.mlirbc"):
        opt = sgdgen.SGD.load_artifact(FORMAT1, variables)
    config = opt._config
    ref = reference.build(config, init)
    rng = np.random.default_rng(3)
    for _ in range(3):
        grads = [rng.standard_normal(v.shape).astype(np.float32) for v in init]
        opt.apply_gradients(zip([g.copy() for g in grads], variables))
        ref = reference.apply_gradients(config, ref, grads, decay_mask=[True, False])
    assert int(opt.iterations.numpy()) == ref.iterations == 3
    for v, want in zip(variables, ref.variables):
        np.testing.assert_allclose(v.numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=v.name)


def test_load_never_regenerates_the_module(written: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 item 6 / issue 15 item 5: loading uses step.mlir as it is; the generator and
    the pass pipeline are never run, and each file is read once."""
    from sgdgen.codegen import generate, pipeline

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the module was regenerated on load")

    monkeypatch.setattr(generate, "generate_text", boom)
    monkeypatch.setattr(pipeline, "run_pipeline", boom)
    reads: list[str] = []
    real = artifact._read_file
    monkeypatch.setattr(artifact, "_read_file", lambda root, name: reads.append(name) or real(root, name))
    default_cache().clear()
    art = artifact.read(written, mesh=MESH, variables=list(VARS))
    step = art.executable()
    assert sorted(reads) == sorted(["manifest.json", *manifest(written)["files"]])
    assert art.program.lowered_text == (written / "step.mlir").read_text()
    run_steps(step, steps=1)


def test_sgd_load_artifact_reads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opt = _optimizer()
    opt.build(_variables({k: np.ones(s, np.float32) for k, s in SHAPES.items()}))
    out = opt.save_artifact(tmp_path / "opt")
    reads: list[str] = []
    real = artifact._read_file
    monkeypatch.setattr(artifact, "_read_file", lambda root, name: reads.append(name) or real(root, name))
    sgdgen.SGD.load_artifact(out, _variables({k: np.ones(s, np.float32) for k, s in SHAPES.items()}))
    assert reads.count("manifest.json") == 1 and reads.count("step.mlir") == 1


def test_check_fresh_is_a_report(written: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = artifact.read(written)
    assert artifact.check_fresh(art) is None
    from sgdgen.codegen import pipeline

    real = pipeline.run_pipeline
    monkeypatch.setattr(pipeline, "run_pipeline",
                        lambda text, *a: real(text, *a).replace("stablehlo.add", "stablehlo.subtract", 1))
    diff = artifact.check_fresh(artifact.read(written))
    assert diff is not None and "-" in diff and "+" in diff and "stablehlo.subtract" in diff
    artifact.read(written).executable()  # today's generator differing does not stop a load


# ---- the executable: compiled afresh, verified, bound to the module ---------------------------


def test_saved_executable_is_not_the_cached_one(prog: StepProgram, tmp_path: Path) -> None:
    """The artifact's executable is a fresh compile named after its fingerprint, even with a
    compiled step in memory (which may come from the persistent cache)."""
    from sgdgen import backend

    prog.executable()
    out = artifact.write(prog, tmp_path / "a")
    (entry,) = manifest(out)["executables"].values()
    exe = backend.deserialize_executable(executable_file(out).read_bytes(), backend.devices_for(MESH.device_ids))
    assert backend.executable_module_name(exe) == "sgdgen_" + entry["fingerprint"]


def test_write_refuses_an_executable_that_does_not_round_trip(prog: StepProgram, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that catches jaxlib's serialize -> deserialize losing code: the deserialized
    executable (here, one for momentum 0.5 under the right name) must give the fresh one's numbers."""
    from sgdgen import backend

    other = StepProgram(SGDConfig.create(**{**CONFIG.get_config(), "momentum": 0.5}), VARS, MESH)
    real = backend.deserialize_executable

    def wrong(blob: bytes, devices: Any) -> Any:
        name = backend.executable_module_name(real(blob, devices))
        return backend.compile_text(artifact._named(other.lowered_text, name), devices)

    monkeypatch.setattr(backend, "deserialize_executable", wrong)
    (tmp_path / "a").mkdir()
    with pytest.raises(ArtifactError, match=r"does not reproduce the compiled step.*executable=False"):
        artifact.write(prog, tmp_path / "a")
    assert list(tmp_path.iterdir()) == [tmp_path / "a"] and not any((tmp_path / "a").iterdir())


def _swap_executable(dst: Path, src_blob: bytes) -> None:
    exe = executable_file(dst)
    exe.write_bytes(src_blob)
    m = manifest(dst)
    m["files"][exe.name] = sha256(exe)
    write_manifest(dst, m)


def test_refuses_another_artifacts_executable(art_copy: Path, tmp_path: Path) -> None:
    """issue 16 item 2: the executable of a momentum-0.5 artifact, hash updated, is refused
    before it runs."""
    other = StepProgram(SGDConfig.create(**{**CONFIG.get_config(), "momentum": 0.5}), VARS, MESH)
    src = artifact.write(other, tmp_path / "other")
    _swap_executable(art_copy, executable_file(src).read_bytes())
    art = artifact.read(art_copy)
    with pytest.raises(ArtifactError, match=r"executable-cpu\.bin was not compiled from this artifact's step\.mlir"):
        art.executable()


def test_refuses_an_executable_whose_signature_is_not_the_abi(art_copy: Path) -> None:
    """An executable carrying the right name but another layout: its parameter shardings
    (read from the executable) differ from the ABI's, and it is refused before it runs."""
    from sgdgen import backend

    m = manifest(art_copy)
    (entry,) = m["executables"].values()
    relaid = StepProgram(CONFIG, tuple(_replace(0, layout=["model", "unsharded"])), MESH)
    devices = backend.devices_for(MESH.device_ids)
    exe = backend.compile_text(artifact._named(relaid.lowered_text, "sgdgen_" + entry["fingerprint"]), devices)
    _swap_executable(art_copy, backend.serialize_executable(exe))
    with pytest.raises(ArtifactError, match=r"argument 1 \('dense/kernel'\).*laid out.*it was not run"):
        artifact.read(art_copy).executable()


def test_today_compile_options_differ_rebuilds(art_copy: Path, fresh_result: list[np.ndarray],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sgdgen import backend

    real = backend.compile_options_summary
    monkeypatch.setattr(backend, "compile_options_summary", lambda d: {**real(d), "new_option": 1})
    with pytest.warns(UserWarning, match="other compile options.*step.mlirbc"):
        step = artifact.read(art_copy).executable()
    assert_same_state(run_steps(step), fresh_result)


_SWAP_CHILD = textwrap.dedent("""
    import sys
    from sgdgen.io import artifact
    try:
        artifact.read(sys.argv[1]).executable()
    except artifact.ArtifactError as e:
        print("REFUSED", e)
""")


def test_swapped_executable_of_another_mesh_is_refused_without_a_crash(art_copy: Path, tmp_path: Path) -> None:
    """A one-device executable swapped into the 8-device artifact: refused, the process lives."""
    one = Mesh.parse("")
    src = artifact.write(StepProgram(CONFIG, (VarSpec.create("w", [4], "float32", one),), one), tmp_path / "one")
    _swap_executable(art_copy, executable_file(src).read_bytes())
    r = subprocess.run([sys.executable, "-c", _SWAP_CHILD, str(art_copy)], env=_child_env(tmp_path / "cache"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "not compiled from this artifact's step.mlir" in r.stdout


# ---- issue 16 item 1: saving with the persistent cache on, and after a load -----------------


_SAVE_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import sgdgen

    mode, path = sys.argv[1], sys.argv[2]
    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    # This step (one variable, momentum) is one whose executable loses its code on
    # serialize -> deserialize -> serialize (jaxlib 0.10.2, CPU); at c68b516 the 2nd and 3rd
    # artifacts below fail with "Function multiply_add_fusion not found".
    w = sgdgen.Variable(np.arange(32, dtype=np.float32).reshape(4, 8) / 10, name="w",
                        layout=sgdgen.Layout(["unsharded", "model"], mesh))

    def grads(k):
        return [(np.full((4, 8), k + 1.0, np.float32), w)]

    if mode == "save":
        opt = sgdgen.SGD(learning_rate=0.1, momentum=0.9, mesh=mesh)
        opt.apply_gradients(grads(0))  # compiles (or loads from the persistent cache)
        opt.save_artifact(path)
    elif mode == "resave":  # save an artifact from an optimizer that was loaded from one
        opt = sgdgen.SGD.load_artifact(sys.argv[3], [w])
        opt.apply_gradients(grads(0))
        opt.save_artifact(path)
    else:  # load and step
        opt = sgdgen.SGD.load_artifact(path, [w])
        for k in range(3):
            opt.apply_gradients(grads(k))
        print(json.dumps({"w": w.numpy().tolist(), "m": np.asarray(opt.get_weights()[1]).tolist(),
                          "iterations": int(opt.iterations.numpy())}))
""")


def _child_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               SGDGEN_CACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="1")
    return env


def _save_child(cache: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-c", _SAVE_CHILD, *map(str, args)], env=_child_env(cache),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_artifacts_saved_with_a_warm_persistent_cache_and_after_a_load_step_correctly(tmp_path: Path) -> None:
    """Reproduces issue 16 item 1: the 2nd process gets its executable from the persistent
    cache, a 3rd saves after load_artifact; each artifact then loads and steps in a fresh
    process (clean exit) to the same numbers as the first one."""
    cache = tmp_path / "cache"
    _save_child(cache, "save", tmp_path / "a1")
    assert any(p.is_file() for p in cache.rglob("*"))
    _save_child(cache, "save", tmp_path / "a2")  # a persistent-cache hit in this process
    _save_child(cache, "resave", tmp_path / "a3", tmp_path / "a1")
    results = [json.loads(_save_child(cache, "load", tmp_path / f"a{k}").strip().splitlines()[-1])
               for k in (1, 2, 3)]
    assert results[0]["iterations"] == 3
    assert results[1] == results[0] and results[2] == results[0]


# ---- atomic writes ----------------------------------------------------------------------


def _old_and_new(tmp_path: Path) -> tuple[StepProgram, StepProgram]:
    one = Mesh.parse("")
    specs = (VarSpec.create("w", [8], "float32", one),)
    old = StepProgram(SGDConfig.create(learning_rate=0.1, momentum=0.9), specs, one)
    new = StepProgram(SGDConfig.create(learning_rate=0.1, momentum=0.5), specs, one)
    return old, new


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


_KILL_CHILD = textwrap.dedent("""
    import sys, time
    from sgdgen.frontend.config import SGDConfig
    from sgdgen.frontend.spec import Mesh, VarSpec
    from sgdgen.io import artifact
    from sgdgen.runtime.program import StepProgram

    stop_at = int(sys.argv[2])
    events = []

    def mark(what):
        events.append(what)
        print(len(events), what, flush=True)
        if len(events) == stop_at:
            time.sleep(120)  # the parent kills us here

    real_write, real_swap = artifact._write_file, artifact._swap_into_place

    def write_file(dirfd, name, data):
        mark("before " + name)
        real_write(dirfd, name, data)

    def swap(tmp, out):
        mark("before swap")
        real_swap(tmp, out)
        mark("after swap")

    artifact._write_file, artifact._swap_into_place = write_file, swap
    one = Mesh.parse("")
    new = StepProgram(SGDConfig.create(learning_rate=0.1, momentum=0.5), (VarSpec.create("w", [8], "float32", one),), one)
    artifact.write(new, sys.argv[1])
    print("done", flush=True)
""")

#: the writer's events: before each of the 5 files (step.mlir, step.mlirbc, the executable,
#: step.jaxexport, the manifest last), before and after the rename
_KILL_POINTS = range(1, 8)


def test_sigkill_mid_save_leaves_the_old_or_the_new_artifact(tmp_path: Path) -> None:
    """issue 16 item 3 / issue 12 item 2: a writer killed at each point of a save over an
    existing artifact leaves a path that loads as exactly the old artifact or as the new one;
    what else it leaves is named `.NAME.incomplete-*` and does not load."""
    import signal

    old_prog, new_prog = _old_and_new(tmp_path)
    seen = []
    for k in _KILL_POINTS:
        d = tmp_path / f"kill{k}"
        d.mkdir()
        target = artifact.write(old_prog, d / "step")
        before = _snapshot(target)
        p = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(target), str(k)], env=_child_env(tmp_path / "c"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = ""
            while not line.startswith(f"{k} "):
                line = p.stdout.readline()
                assert line, p.stderr.read()[-3000:]
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(timeout=60)
        art = artifact.read(target)
        momentum = art.manifest.config["momentum"]
        if momentum == 0.9:
            assert _snapshot(target) == before, k  # exactly the old artifact
        else:
            assert momentum == 0.5 and "after swap" in line, (k, line)
        art.executable()
        seen.append(momentum)
        for left in d.iterdir():
            if left != target:
                assert left.name.startswith(".step.incomplete-"), left
                with pytest.raises(ArtifactError, match="interrupted save"):  # a leftover never loads
                    artifact.read(left)
    assert seen == [0.9] * 6 + [0.5]


def test_enospc_half_way_leaves_the_old_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno as errno_mod

    old_prog, new_prog = _old_and_new(tmp_path)
    target = artifact.write(old_prog, tmp_path / "step")
    before = _snapshot(target)
    budget = [sum(len(v) for v in before.values()) // 2]
    real = os.write

    def full_disk(fd: int, data: Any) -> int:
        if budget[0] <= 0:
            raise OSError(errno_mod.ENOSPC, "No space left on device")
        n = real(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    monkeypatch.setattr(artifact.os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        artifact.write(new_prog, target)
    monkeypatch.undo()
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["step"]  # the half-written directory is gone
    assert artifact.read(target).manifest.config["momentum"] == 0.9


def test_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    old_prog, new_prog = _old_and_new(tmp_path)
    target = artifact.write(old_prog, tmp_path / "step")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("step.mlir", "manifest.json"):
        (target / name).unlink()
        (target / name).symlink_to(victim)
    with pytest.raises(ArtifactError, match="symlink"):  # a load does not read through it either
        artifact.read(target)
    artifact.write(new_prog, target)
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in target.iterdir())
    assert artifact.read(target).manifest.config["momentum"] == 0.5


def test_refuses_a_symlink_target_and_a_directory_that_is_not_an_artifact(tmp_path: Path) -> None:
    old_prog, _ = _old_and_new(tmp_path)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real_dir)
    with pytest.raises(ArtifactError, match="is a symlink.*real path"):
        artifact.write(old_prog, link)
    assert not any(real_dir.iterdir())
    (real_dir / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an sgdgen artifact.*not replaced"):
        artifact.write(old_prog, real_dir)
    assert [p.name for p in real_dir.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_replace_without_rename_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2(RENAME_EXCHANGE) is missing: the old artifact is set aside, the new one
    renamed in, the old one removed; nothing else is left."""
    old_prog, new_prog = _old_and_new(tmp_path)
    target = artifact.write(old_prog, tmp_path / "step")
    monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    artifact.write(new_prog, target)
    assert [p.name for p in tmp_path.iterdir()] == ["step"]
    assert artifact.read(target).manifest.config["momentum"] == 0.5


def test_replace_without_rename_exchange_failing_restores_the_old(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback's second rename fails: the old artifact goes back to the path."""
    old_prog, new_prog = _old_and_new(tmp_path)
    target = artifact.write(old_prog, tmp_path / "step")
    before = _snapshot(target)
    monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    real = os.rename

    def failing(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".step.incomplete-"):
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(artifact.os, "rename", failing)
    with pytest.raises(OSError, match="I/O error"):
        artifact.write(new_prog, target)
    monkeypatch.undo()
    assert _snapshot(target) == before and [p.name for p in tmp_path.iterdir()] == ["step"]


def test_refuses_an_executable_that_does_not_deserialize(art_copy: Path) -> None:
    """A damaged executable with its hash updated (and its name intact): JAX's parse error
    becomes an ArtifactError that names the file; nothing ran."""
    exe = executable_file(art_copy)
    data = bytearray(exe.read_bytes())
    data[len(data) // 100] ^= 0xFF  # in the header, before the HLO module
    _swap_executable(art_copy, bytes(data))
    with pytest.raises(ArtifactError, match=r"executable-cpu\.bin does not deserialize.*not run"):
        artifact.read(art_copy).executable()
