"""The command line, run as users run it: `sgdgen emit | compile | inspect | demo` and
`sgdgen-opt`, each in a subprocess of this interpreter (the installed package).

Conventions checked (sgdgen/cli.py, sgdgen/opt.py): IR on stdout, diagnostics on stderr,
exit status 2 for bad input and 1 for a failed check, never a Python traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jaxlib.mlir.dialects import stablehlo

import sgdgen
from sgdgen.codegen.ir import parse_module
from sgdgen.codegen.pipeline import DEFAULT_PIPELINE
from sgdgen.io.manifest import CALLING_CONVENTION_VERSION, FORMAT_VERSION

BIN = Path(sys.executable).parent
MESH = "batch=2,model=4"
CONFIG = {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "global_clipnorm": 1.0,
          "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 5}
VARS = [
    {"name": "dense/kernel", "shape": [8, 16], "dtype": "float32", "layout": ["unsharded", "model"]},
    {"name": "dense/bias", "shape": [16], "dtype": "float32", "decay": False},  # replicated (no layout)
    {"name": "proj", "shape": [4, 8], "dtype": "float32", "layout": ["batch", "model"]},
]
#: sum of nbytes: 8*16*4 + 16*4 + 4*8*4
VAR_BYTES = 512 + 64 + 128
PASSES = ("sgd-fuse-step", "sgd-insert-collectives", "sgd-shard-weight-update", "sgd-alias-buffers", "sgd-cpu-kernels",
          "sgd-cpu-update")


@pytest.fixture(scope="module")
def env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return subprocess_env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "vars.json").write_text(json.dumps(VARS))
    return {"config": str(d / "config.json"), "vars": str(d / "vars.json"), "dir": str(d)}


def run(args: list[str], env: dict[str, str], *, tool: str = "sgdgen", stdin: str | None = None,
        cwd: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sgdgen.tools.cli" if tool == "sgdgen" else "sgdgen.tools.opt"]
    if tool == "sgdgen-opt-script":
        cmd = [str(BIN / "sgdgen-opt")]
    elif tool == "sgdgen-script":
        cmd = [str(BIN / "sgdgen")]
    return subprocess.run(cmd + args, env=env, input=stdin, capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def step_args(inputs: dict[str, str], mesh: str = MESH) -> list[str]:
    return ["--config", inputs["config"], "--mesh", mesh, "--vars", inputs["vars"]]


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert "Traceback" not in r.stdout


# ---- emit ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage0(inputs: dict[str, str], env: dict[str, str]) -> str:
    r = run(["emit", *step_args(inputs)], env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def lowered(inputs: dict[str, str], env: dict[str, str]) -> str:
    r = run(["emit", *step_args(inputs), "--lowered"], env, tool="sgdgen-script")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_emit_prints_a_verified_stage0_module(stage0: str) -> None:
    parse_module(stage0)  # parses and verifies, or raises MLIRError
    assert 'sdy.mesh @mesh = <["batch"=2, "model"=4]>' in stage0
    assert "func.func public @main" in stage0
    assert '#sdy.sharding<@mesh, [{}, {"model"}]>' in stage0
    assert '#sdy.sharding<@mesh, [{"batch"}, {"model"}]>' in stage0
    assert "stablehlo.all_reduce" not in stage0 and "sdy.manual_computation" not in stage0


def test_emit_lowered_has_one_all_reduce(lowered: str) -> None:
    parse_module(lowered)
    # global_clipnorm on 2x4 with three differently laid-out variables: ONE all_reduce for every norm.
    assert lowered.count("stablehlo.all_reduce") == 1
    assert lowered.count("sdy.manual_computation") == 1
    assert 'manual_axes={"batch", "model"}' in lowered
    assert "replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]>" in lowered
    # every state buffer updated in place: iterations + 3 x (variable, momentum, average)
    assert lowered.count("tf.aliasing_output") == 1 + 3 * len(VARS)


def test_sgdgen_opt_on_a_file_and_on_stdin(stage0: str, lowered: str, tmp_path: Path,
                                           env: dict[str, str]) -> None:
    f = tmp_path / "stage0.mlir"
    f.write_text(stage0)
    r = run([str(f), f"--pass-pipeline={DEFAULT_PIPELINE}"], env, tool="sgdgen-opt-script")
    assert r.returncode == 0, r.stderr
    assert r.stdout == lowered  # sgdgen-opt with the default pipeline is `emit --lowered`
    r = run(["-", "--pass-pipeline", "builtin.module(sgd-fuse-step,canonicalize)"], env, tool="sgdgen-opt",
            stdin=stage0)
    assert r.returncode == 0, r.stderr
    fused = parse_module(r.stdout)
    assert fused is not None
    assert "func.call" not in r.stdout and "call @" not in r.stdout  # the stages are inlined
    assert "stablehlo.all_reduce" not in r.stdout  # not partitioned yet
    r = run([], env, tool="sgdgen-opt", stdin=stage0)  # no pipeline: parse, verify, print
    assert r.returncode == 0 and r.stdout == str(parse_module(stage0))


def test_sgdgen_opt_lists_the_passes(env: dict[str, str]) -> None:
    r = run(["--list-passes"], env, tool="sgdgen-opt-script")
    assert r.returncode == 0, r.stderr
    listed = [line.split(":", 1)[0] for line in r.stdout.splitlines() if line.strip()]
    assert sorted(listed) == sorted(PASSES)
    assert all(": " in line and len(line.split(": ", 1)[1]) > 10 for line in r.stdout.splitlines() if line)


@pytest.mark.parametrize("pipeline,expected", [
    ("builtin.module(sgd-no-such-pass)", "'sgd-no-such-pass' does not refer to a registered pass"),
    ("builtin.module(sgd-fuse-step,nope-upstream)", "'nope-upstream' does not refer to a registered pass"),
    ("builtin.module(sgd-fuse-step{x=1})", "sgd-fuse-step takes no options"),
])
def test_sgdgen_opt_bad_pipeline(stage0: str, env: dict[str, str], pipeline: str, expected: str) -> None:
    r = run(["--pass-pipeline", pipeline], env, tool="sgdgen-opt", stdin=stage0)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("sgdgen-opt: ") and expected in r.stderr, r.stderr
    no_traceback(r)


def test_sgdgen_opt_bad_ir_and_failing_pass(stage0: str, tmp_path: Path, env: dict[str, str]) -> None:
    r = run([], env, tool="sgdgen-opt", stdin="func.func @f( {\n")
    assert r.returncode == 1 and r.stdout == ""
    assert re.match(r"<stdin>:1:\d+: error: ", r.stderr), r.stderr
    no_traceback(r)
    f = tmp_path / "s.mlir"
    f.write_text(stage0)
    r = run([str(f), "--pass-pipeline=builtin.module(sgd-insert-collectives)"], env, tool="sgdgen-opt")
    assert r.returncode == 1 and r.stdout == ""
    assert "error" in r.stderr and "sgd-insert-collectives" in r.stderr and "sgd-fuse-step first" in r.stderr
    no_traceback(r)
    r = run([str(tmp_path / "missing.mlir")], env, tool="sgdgen-opt")
    assert r.returncode == 1 and "cannot read" in r.stderr and "missing.mlir" in r.stderr
    no_traceback(r)


GOOD_VAR = {"name": "w", "shape": [8, 16], "dtype": "float32", "layout": ["unsharded", "model"]}
BAD_INPUTS: dict[str, tuple[Any, Any, str, list[str]]] = {
    # name: (config, vars, mesh, pieces of the message)
    "config-not-json": ("{not json", [GOOD_VAR], MESH, ["config", "not valid JSON"]),
    "config-unknown-key": ({"learning_rate": 0.1, "bogus_key": 1}, [GOOD_VAR], MESH, ["config", "bogus_key"]),
    "config-bad-value": ({"momentum": 2.0}, [GOOD_VAR], MESH, ["config", "momentum"]),
    "config-not-object": ([1, 2], [GOOD_VAR], MESH, ["config", "JSON object"]),
    "vars-not-json": ({}, "[{", MESH, ["vars", "not valid JSON"]),
    "vars-empty": ({}, [], MESH, ["vars", "non-empty JSON list"]),
    "vars-unknown-field": ({}, [{**GOOD_VAR, "layot": []}], MESH, ["vars[0]", "unknown field", "layot"]),
    "vars-missing-field": ({}, [{"name": "w", "shape": [8]}], MESH, ["vars[0]", "missing field 'dtype'"]),
    "vars-bad-dtype": ({}, [{**GOOD_VAR, "dtype": "int32"}], MESH, ["'w'", "dtype int32"]),
    "vars-bad-shape": ({}, [{**GOOD_VAR, "shape": "8x16"}], MESH, ["'w'", "'shape'"]),
    "mesh-not-name-size": ({}, [GOOD_VAR], "batch=2,model", ["--mesh", "'model'", "NAME=SIZE"]),
    "mesh-bad-size": ({}, [GOOD_VAR], "batch=0,model=4", ["--mesh", "'batch'", "size 0"]),
    "mesh-duplicate-axis": ({}, [GOOD_VAR], "model=2,model=4", ["--mesh", "'model'", "twice"]),
    "unknown-axis": ({}, [{**GOOD_VAR, "layout": ["unsharded", "tensor"]}], MESH,
                     ["'w'", "mesh axis 'tensor'", "dimension 1", "['batch', 'model']"]),
    "layout-rank": ({}, [{**GOOD_VAR, "layout": ["model"]}], MESH, ["'w'", "rank 1", "rank 2"]),
    "non-divisible": ({}, [{**GOOD_VAR, "shape": [8, 6]}], MESH,
                      ["'w'", "dimension 1 of size 6 is not divisible by 4", "pad"]),
    "duplicate-name": ({}, [GOOD_VAR, GOOD_VAR], MESH, ["'w'", "twice"]),
    "global-clipnorm-mixed-dtypes": ({"global_clipnorm": 1.0}, [GOOD_VAR, {**GOOD_VAR, "name": "b",
                                                                          "dtype": "bfloat16"}], MESH,
                                     ["global_clipnorm", "bfloat16", "float32"]),
}


def _write_inputs(d: Path, config: Any, variables: Any) -> tuple[Path, Path]:
    c, v = d / "c.json", d / "v.json"
    c.write_text(config if isinstance(config, str) else json.dumps(config))
    v.write_text(variables if isinstance(variables, str) else json.dumps(variables))
    return c, v


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_emit_bad_input_exits_2(case: str, tmp_path: Path, env: dict[str, str]) -> None:
    config, variables, mesh, pieces = BAD_INPUTS[case]
    c, v = _write_inputs(tmp_path, config, variables)
    r = run(["emit", "--config", str(c), "--mesh", mesh, "--vars", str(v)], env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("sgdgen emit: error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for piece in pieces:
        assert piece in r.stderr, (piece, r.stderr)
    no_traceback(r)


def test_emit_missing_file_exits_2(tmp_path: Path, env: dict[str, str], inputs: dict[str, str]) -> None:
    r = run(["emit", "--config", str(tmp_path / "nope.json"), "--mesh", MESH, "--vars", inputs["vars"]], env)
    assert r.returncode == 2 and "sgdgen emit: error: config" in r.stderr and "nope.json" in r.stderr
    no_traceback(r)


def test_emit_rejects_non_boolean_decay(tmp_path: Path, env: dict[str, str]) -> None:
    c, v = _write_inputs(tmp_path, {}, [{**GOOD_VAR, "decay": "no"}])
    r = run(["emit", "--config", str(c), "--mesh", MESH, "--vars", str(v)], env)
    assert r.returncode == 2 and "decay" in r.stderr


@pytest.mark.parametrize("pipeline", ["builtin.module(sgd-no-such-pass)", "builtin.module(sgd-insert-collectives)"])
def test_emit_lowered_bad_pipeline_is_not_a_traceback(pipeline: str, inputs: dict[str, str],
                                                      env: dict[str, str]) -> None:
    r = run(["emit", *step_args(inputs), "--lowered", "--pass-pipeline", pipeline], env)
    assert r.returncode == 2 and r.stderr.startswith("sgdgen emit: error: ")
    no_traceback(r)


# ---- compile and inspect -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(inputs: dict[str, str], env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "art"
    r = run(["compile", *step_args(inputs), "-o", str(out)], env, tool="sgdgen-script")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (3 variables, mesh {MESH})" in r.stdout
    return out


def test_compile_writes_an_artifact(compiled: Path) -> None:
    m = json.loads((compiled / "manifest.json").read_text())
    assert set(m["files"]) == {"step.mlir", "step.mlirbc", "executable-cpu.bin", "step.jaxexport"}
    assert {p.name for p in compiled.iterdir()} == set(m["files"]) | {"manifest.json"}
    # a variable given without a layout is written out replicated
    assert m["variables"] == [{**v, "layout": v.get("layout", ["unsharded"] * len(v["shape"]))} for v in VARS]
    assert m["config"]["global_clipnorm"] == 1.0 and m["config"]["use_ema"] is True


def test_compile_bad_input_exits_2(inputs: dict[str, str], env: dict[str, str], tmp_path: Path) -> None:
    r = run(["compile", *step_args(inputs, mesh="batch=2,model=3"), "-o", str(tmp_path / "o")], env)
    assert r.returncode == 2
    assert r.stderr.startswith("sgdgen compile: error: ") and "not divisible by 3" in r.stderr
    assert not (tmp_path / "o").exists()
    no_traceback(r)


def test_inspect_json(compiled: Path, env: dict[str, str]) -> None:
    import jaxlib

    r = run(["inspect", str(compiled), "--json"], env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["variables"] == 3
    assert info["parameters"] == 8 * 16 + 16 + 4 * 8
    # variables + momenta + EMA averages, + the int64 iteration counter
    assert info["state_bytes"] == 3 * VAR_BYTES + 8 == 2120
    assert info["all_reduce"] == 1 and info["manual_computation"] == 1
    assert info["aliased_buffers"] == 1 + 3 * 3
    assert info["mesh"] == MESH
    assert info["format_version"] == FORMAT_VERSION and info["sgdgen_version"] == sgdgen.__version__
    assert info["calling_convention_version"] == CALLING_CONVENTION_VERSION
    assert info["stablehlo_target_version"] == stablehlo.get_current_version()
    assert info["executables"]["cpu"]["jaxlib"] == jaxlib.__version__
    assert info["config"]["momentum"] == 0.9
    # the variables table the text form shows (issue 8), layouts filled in
    assert info["variable_table"] == [{"layout": ["unsharded"] * len(v["shape"]), "decay": True, **v} for v in VARS]
    assert "fresh" not in info  # only with --check-fresh


def test_inspect_table(compiled: Path, env: dict[str, str]) -> None:
    import jaxlib

    r = run(["inspect", str(compiled)], {**env, "COLUMNS": "200"}, tool="sgdgen-script")
    assert r.returncode == 0, r.stderr
    out = r.stdout

    def row(key: str) -> str:
        m = re.search(rf"{key}\s*[│|]\s*(\S[^│|]*?)\s*[│|]", out)
        assert m, (key, out)
        return m.group(1)

    assert row("format_version") == str(FORMAT_VERSION)
    assert row("calling_convention_version") == str(CALLING_CONVENTION_VERSION)
    assert row("state_bytes") == "2120"
    assert row("all_reduce") == "1"
    assert row("variables") == "3"
    assert row("sgdgen_version") == sgdgen.__version__
    assert row("stablehlo_target_version") == stablehlo.get_current_version()
    assert row("mesh") == MESH
    assert f"jaxlib {jaxlib.__version__}" in out
    for v in VARS:
        assert v["name"] in out and v["dtype"] in out
    assert "['batch', 'model']" in out and "['unsharded', 'model']" in out


@pytest.mark.parametrize("damage,reason", [
    ("flip-mlirbc", "step.mlirbc does not match its sha256"),
    ("flip-executable", "executable-cpu.bin does not match its sha256"),
    ("delete-mlir", "step.mlir is missing"),
    ("bad-manifest", "corrupt manifest"),
    ("no-manifest", "not an sgdgen artifact"),
])
def test_inspect_refuses_a_damaged_artifact(compiled: Path, tmp_path: Path, env: dict[str, str], damage: str,
                                            reason: str) -> None:
    import shutil

    art = tmp_path / "art"
    shutil.copytree(compiled, art)
    if damage.startswith("flip-"):
        f = art / ("step.mlirbc" if damage == "flip-mlirbc" else "executable-cpu.bin")
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "delete-mlir":
        (art / "step.mlir").unlink()
    elif damage == "bad-manifest":
        (art / "manifest.json").write_text("{")
    else:
        (art / "manifest.json").unlink()
    r = run(["inspect", str(art), "--json"], env)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("sgdgen inspect: ") and reason in r.stderr, r.stderr
    assert "rewrite" in r.stderr or "sgdgen compile" in r.stderr
    no_traceback(r)


def test_inspect_check_fresh(compiled: Path, env: dict[str, str]) -> None:
    r = run(["inspect", str(compiled), "--json", "--check-fresh"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fresh"] is True
    r = run(["inspect", str(compiled), "--check-fresh"], {**env, "COLUMNS": "200"})
    assert r.returncode == 0 and "today's sgdgen emits the same step.mlir" in r.stdout


def test_inspect_check_fresh_reports_a_difference_and_still_loads(env: dict[str, str]) -> None:
    """An artifact whose step.mlir today's generator would write differently (the format-1 test
    artifact, its module text altered and rehashed as an older generator might have left it)."""
    import hashlib
    import shutil
    import tempfile

    src = Path(__file__).parent / "data" / "format1-c68b516"
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "old"
        shutil.copytree(src, art)
        mlir = art / "step.mlir"
        mlir.write_text(mlir.read_text().replace('sgdgen.version = "0.1.0"', 'sgdgen.version = "0.0.9"', 1))
        m = json.loads((art / "manifest.json").read_text())
        m["files"]["step.mlir"] = hashlib.sha256(mlir.read_bytes()).hexdigest()
        (art / "manifest.json").write_text(json.dumps(m))
        r = run(["inspect", str(art), "--json", "--check-fresh"], env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["fresh"] is False and info["format_version"] == 1
    assert '-module @sgd_step attributes {mhlo.num_partitions = 8 : i32, mhlo.num_replicas = 1 : i32, ' \
           'sgdgen.version = "0.0.9"}' in info["fresh_diff"]


def test_compile_twice_replaces_the_artifact(inputs: dict[str, str], env: dict[str, str], tmp_path: Path) -> None:
    """Twice to one directory (the second with a warm persistent cache): the path holds one
    complete artifact, nothing is left beside it, and it verifies."""
    out = tmp_path / "art"
    for _ in range(2):
        r = run(["compile", *step_args(inputs), "-o", str(out)], env)
        assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert run(["inspect", str(out)], env).returncode == 0


def test_compile_one_device_message(inputs: dict[str, str], env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text(json.dumps([{"name": "w", "shape": [4], "dtype": "float32"}]))
    r = run(["compile", "--config", inputs["config"], "--vars", str(tmp_path / "v.json"), "-o",
             str(tmp_path / "o")], env)
    assert r.returncode == 0, r.stderr
    assert "(one device)" in r.stdout, r.stdout


@pytest.mark.parametrize("case", ["mesh-too-large", "output-is-a-file", "output-is-a-symlink",
                                  "output-is-not-an-artifact"])
def test_compile_errors_are_not_tracebacks(case: str, inputs: dict[str, str], env: dict[str, str],
                                           tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text(json.dumps([{"name": "w", "shape": [16], "dtype": "float32"}]))
    out = tmp_path / "o"
    mesh = "x=16" if case == "mesh-too-large" else "x=2"
    if case == "output-is-a-file":
        out.write_text("")
    elif case == "output-is-a-symlink":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    elif case == "output-is-not-an-artifact":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    r = run(["compile", "--config", inputs["config"], "--mesh", mesh, "--vars", str(tmp_path / "v.json"),
             "-o", str(out)], env)
    assert r.returncode == 2 and r.stderr.startswith("sgdgen compile: error: ")
    expected = {"output-is-a-file": "not a directory", "output-is-a-symlink": "is a symlink",
                "output-is-not-an-artifact": "not an sgdgen artifact", "mesh-too-large": "devices"}[case]
    assert expected in r.stderr, r.stderr
    no_traceback(r)


# ---- demo ------------------------------------------------------------------------------------


def test_demo(env: dict[str, str]) -> None:
    r = run(["demo", "--epochs", "2", "--no-progress"], {**env, "COLUMNS": "200"}, tool="sgdgen-script",
            timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    losses = [float(x) for x in re.findall(r"epoch \d+: loss ([0-9.eE+-]+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0], out
    m = re.search(r"largest difference from sgdgen\.reference fed the same gradients: ([0-9.eE+-]+) "
                  r"\(relative to the largest weight: ([0-9.eE+-]+)\)", out)
    assert m, out
    assert float(m.group(2)) <= 1e-5
    assert "32 steps" in out and "FAIL" not in out
    assert r.stdout.rstrip().splitlines()[-1].startswith(
        "PASS: compiled SGD vs sgdgen.reference over 32 steps on 8 devices (mesh batch=2,model=4)"), r.stdout
    no_traceback(r)


def test_demo_uses_the_devices_it_finds(env: dict[str, str]) -> None:
    """The issue's command: XLA_FLAGS asks for 4 devices, so the demo runs on a 2x2 mesh."""
    r = run(["demo", "--epochs", "1", "--no-progress"],
            {**env, "COLUMNS": "200", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
            tool="sgdgen-script", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.rstrip().splitlines()[-1]
    assert last.startswith("PASS: compiled SGD vs sgdgen.reference over 16 steps on 4 devices (mesh batch=2,model=2)")
    assert "(fell)" in last
    no_traceback(r)


@pytest.mark.parametrize("devices, mesh", [(1, (1, 1)), (2, (1, 2)), (3, (1, 2)), (4, (2, 2)), (7, (2, 2)),
                                           (8, (2, 4)), (16, (2, 4))])
def test_demo_mesh_fits_the_device_count(devices: int, mesh: tuple[int, int]) -> None:
    from sgdgen.tools.demo import demo_mesh

    got = demo_mesh(devices)
    assert (got["batch"], got["model"]) == mesh and got["batch"] * got["model"] <= devices


def test_demo_fail_is_a_verdict_line_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from sgdgen.tools import cli, demo

    drifted = demo.DemoResult([1.0, 0.5], 0.01, 2 * demo.MAX_REL_DIFF, 32, 1.0, 0.1, 4, "batch=2,model=2",
                              [1.0] * 16 + [0.5] * 16)
    monkeypatch.setattr(demo, "run_demo", lambda **kw: drifted)
    assert cli.main(["demo", "--no-progress"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "FAIL: compiled SGD vs sgdgen.reference over 32 steps on 4 devices (mesh batch=2,model=2): max " \
           f"relative difference {2 * demo.MAX_REL_DIFF:.3g} (allowed {demo.MAX_REL_DIFF:g})" in out
    flat = demo.DemoResult([1.0], 0.0, 0.0, 16, 1.0, 0.1, 1, "batch=1,model=1", [1.0] * 16)
    assert not flat.passed and "FAIL" in flat.verdict() and "did not fall" in flat.verdict()


def test_every_flag_has_help_text() -> None:
    """`sgdgen <cmd> --help` documents each flag (the issue: --epochs had none)."""
    from sgdgen.tools.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"sgdgen {name} {action.option_strings[0]} has no help text"


# ---- bench -----------------------------------------------------------------------------------


def test_bench_leaves_no_cache_warnings_and_restores_the_cache() -> None:
    """The bench runs on a private, memory-only executable cache and puts the process-wide one
    back; it writes no cache anywhere, so it warns about none, and JAX's config is untouched."""
    import warnings

    import jax
    import jax.numpy as jnp

    from sgdgen.runtime.cache import default_cache
    from sgdgen.tools import benchmark

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    cache_before = default_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = benchmark.run(quick=True, rounds=1, per_round=1, only=["few-large"])
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(5.0)).block_until_ready()  # a compile after the bench
    assert list(result["models"]) == ["few-large"]
    cache_warnings = [str(w.message) for w in caught if "cache" in str(w.message)]
    assert not cache_warnings, cache_warnings[:2]
    assert {k: getattr(jax.config, k) for k in keys} == before
    assert default_cache() is cache_before


def test_demo_keras_compares_with_keras_sgd(env: dict[str, str]) -> None:
    """`sgdgen demo --keras`: sgdgen.keras.SGD and keras.optimizers.SGD from the same weights on the
    same batches, one verdict line, exit 0 on PASS."""
    r = subprocess.run([sys.executable, "-m", "sgdgen.tools.cli", "demo", "--keras", "--epochs", "2"],
                       capture_output=True, text=True, env={**env, "KERAS_BACKEND": "jax"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith(("PASS", "FAIL"))]
    assert len(lines) == 1 and lines[0].startswith("PASS: sgdgen.keras.SGD vs keras.optimizers.SGD"), r.stdout
    assert r.stdout.count("epoch ") == 2


def test_demo_keras_fails_when_the_runs_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    from sgdgen.tools import keras_demo

    monkeypatch.setattr(keras_demo, "MAX_REL_DIFF", -1.0)  # nothing can be that close: the FAIL path
    result = keras_demo.run_keras_demo(epochs=1)
    assert not result.passed and result.verdict().startswith("FAIL")
