"""Hostile and unlucky inputs (issue 16, items 9-11), each run as users run it, in a
subprocess: the process must end with a diagnostic and a clean exit status (never a
signal, never a Python traceback), and a step must survive an unusable cache directory.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sgdgen.tools.opt import MAX_NESTING, line_col

#: Random-looking bytes that are not UTF-8 (0xff never occurs in UTF-8) after a valid prefix.
BINARY = b"module {}\n" + bytes(range(0x80, 0x100)) * 8


@pytest.fixture(scope="module")
def env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return subprocess_env


def run(module: str, args: list[str], env: dict[str, str], stdin: bytes | None = None,
        timeout: float = 300) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, env=env,
                       timeout=timeout)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def clean_exit(rc: int, err: str, status: int) -> None:
    """Exited (not killed by a signal) with `status`, and said why without a traceback."""
    assert rc >= 0, f"killed by {signal.Signals(-rc).name}: {err[-2000:]}"
    assert rc == status, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "error:" in err


# ---------------------------------------------------------------- sgdgen-opt (16.10)

DEEP_INPUTS = {
    "5000-nested-modules": "module {" * 5000 + "}" * 5000,  # SIGSEGV before
    "deep-attribute-60KB": "module attributes {a = " + "[" * 30_000 + "]" * 30_000 + "} {}",
    "deep-parens": "module {\n  func.func @f() -> " + "(" * 20_000 + ")" * 20_000 + "\n}",
}


@pytest.mark.parametrize("name", DEEP_INPUTS)
def test_opt_refuses_deep_nesting(name: str, tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / f"{name}.mlir"
    path.write_text(DEEP_INPUTS[name])
    rc, _, err = run("sgdgen.tools.opt", [str(path), "--pass-pipeline=builtin.module(canonicalize)"], env)
    clean_exit(rc, err, 1)
    text = DEEP_INPUTS[name]  # no strings or comments: each bracket counts
    depths = itertools.accumulate((c in "([{") - (c in ")]}") for c in text)
    offset = next(i for i, d in enumerate(depths) if d > MAX_NESTING)
    line, col = line_col(text, offset)
    assert err.startswith(f"{path}:{line}:{col}: error: brackets nest deeper than {MAX_NESTING} levels")


def test_opt_accepts_nesting_at_the_limit(tmp_path: Path, env: dict[str, str]) -> None:
    """MAX_NESTING nested modules parse, run a pass and print (the margin below the crash)."""
    path = tmp_path / "limit.mlir"
    path.write_text("module {" * MAX_NESTING + "}" * MAX_NESTING)
    rc, out, err = run("sgdgen.tools.opt", [str(path), "--pass-pipeline=builtin.module(canonicalize,cse)"], env)
    assert rc == 0, err[-2000:]
    assert out.count("module {") == MAX_NESTING


def test_opt_binary_file(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "step.mlirbc"
    path.write_bytes(BINARY)
    rc, _, err = run("sgdgen.tools.opt", [str(path)], env)
    clean_exit(rc, err, 1)
    offset = BINARY.index(b"\x80")
    assert err.startswith(f"{path}: error: byte 0x80 at offset {offset} (line 2, column 1) is not UTF-8")


def test_opt_binary_stdin(env: dict[str, str]) -> None:
    rc, _, err = run("sgdgen.tools.opt", ["-"], env, stdin=BINARY)
    clean_exit(rc, err, 1)
    assert err.startswith("<stdin>: error: byte 0x80 at offset")


def test_opt_real_bytecode(tmp_path: Path, env: dict[str, str]) -> None:
    """An artifact's step.mlirbc (MLIR bytecode starts with 'ML\\xefR') is named as not text."""
    from jaxlib.mlir import ir

    from sgdgen.codegen.ir import make_context

    with make_context():
        module = ir.Module.parse("module {}")
        path = tmp_path / "real.mlirbc"
        with open(path, "wb") as f:
            module.operation.write_bytecode(f)
    rc, _, err = run("sgdgen.tools.opt", [str(path)], env)
    clean_exit(rc, err, 1)
    assert "is not UTF-8" in err and "not bytecode or binary files" in err


# ---------------------------------------------------------------- sgdgen CLI JSON (16.10)

VARS = [{"name": "w", "shape": [8], "dtype": "float32"}]


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize("which", ["config", "vars"])
def test_cli_deeply_nested_json(which: str, tmp_path: Path, env: dict[str, str]) -> None:
    deep = "[" * 100_000 + "]" * 100_000  # RecursionError traceback before
    files = {"config": write(tmp_path, "config.json", "{}"), "vars": write(tmp_path, "vars.json", json.dumps(VARS))}
    files[which] = write(tmp_path, "deep.json", deep)
    rc, _, err = run("sgdgen.tools.cli", ["emit", "--config", files["config"], "--vars", files["vars"]], env)
    clean_exit(rc, err, 2)
    assert f"{which} {files[which]}: JSON nested too deeply" in err


def test_cli_binary_json(tmp_path: Path, env: dict[str, str]) -> None:
    config = write(tmp_path, "config.json", b'{"momentum": 0.5\xff}')
    rc, _, err = run("sgdgen.tools.cli", ["emit", "--config", config, "--vars", write(tmp_path, "v.json", "[]")], env)
    clean_exit(rc, err, 2)
    assert f"config {config}: byte 0xff at offset 16 (line 1, column 17) is not UTF-8" in err


def test_cli_json_nan_learning_rate(tmp_path: Path, env: dict[str, str]) -> None:
    """Python's JSON reader accepts NaN and Infinity; the config refuses them (16.8)."""
    config = write(tmp_path, "config.json", '{"learning_rate": Infinity}')
    rc, _, err = run("sgdgen.tools.cli", ["emit", "--config", config,
                                          "--vars", write(tmp_path, "v.json", json.dumps(VARS))], env)
    clean_exit(rc, err, 2)
    assert "`learning_rate` must be a finite number" in err


# ---------------------------------------------------------------- shapes (16.9)


@pytest.mark.parametrize("shape", [[2**62], [2**40, 2**40]])
@pytest.mark.parametrize("command", ["emit", "compile"])
def test_cli_huge_shapes_are_refused_before_generating(shape: list[int], command: str, tmp_path: Path,
                                                       env: dict[str, str]) -> None:
    """Both aborted the process (SIGABRT) in compile; now a usage error names the variable."""
    variables = write(tmp_path, "vars.json", json.dumps([{"name": "huge", "shape": shape, "dtype": "float32"}]))
    args = [command, "--config", write(tmp_path, "c.json", "{}"), "--vars", variables]
    if command == "compile":
        args += ["-o", str(tmp_path / "out.sgd")]
    rc, out, err = run("sgdgen.tools.cli", args, env)
    clean_exit(rc, err, 2)
    assert f"vars {variables}: variable 'huge': shape {shape}" in err and "int64" in err
    assert out == "" and not (tmp_path / "out.sgd").exists()


# ---------------------------------------------------------------- cache directory (16.11)

STEP = """
import warnings, numpy as np, sgdgen
warnings.simplefilter("always")
w = sgdgen.Variable(np.ones(8, np.float32), name="w")
opt = sgdgen.SGD(learning_rate=0.5)
for _ in range(3):
    opt.apply_gradients([(np.full(8, 0.25, np.float32), w)])
print(repr(w.numpy().tolist()), int(opt.iterations.numpy()))
"""


def unusable_dirs(tmp_path: Path) -> dict[str, str]:
    regular = tmp_path / "a-file"
    regular.write_text("not a directory")
    return {"regular-file": str(regular), "under-a-file": str(regular / "xla"), "proc": "/proc/sgdgen-cache",
            "proc-self": "/proc/self"}


@pytest.mark.parametrize("case", ["regular-file", "under-a-file", "proc", "proc-self"])
def test_unusable_cache_dir_warns_once_and_steps(case: str, tmp_path: Path, env: dict[str, str]) -> None:
    cache = unusable_dirs(tmp_path)[case]
    rc, out, err = _run_code(STEP, {**env, "SGDGEN_CACHE_DIR": cache})
    assert rc == 0, err[-3000:]
    expected = [1.0 - 3 * 0.5 * 0.25] * 8  # three plain SGD steps; every value is exact in float32
    assert out.strip() == f"{expected!r} 3"
    assert err.count(f"cache directory {cache!r} cannot be used") == 1, err[-3000:]
    assert "FileExistsError" not in err and "Traceback" not in err


def _run_code(code: str, env: dict[str, str]) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def test_usable_cache_dir_is_made_and_used(tmp_path: Path) -> None:
    from sgdgen.runtime.cache import ExecutableCache

    target = tmp_path / "new" / "xla"
    assert ExecutableCache(target).directory == str(target) and target.is_dir()


def test_unusable_cache_dir_warning_is_given_once_per_cache(tmp_path: Path) -> None:
    from sgdgen.runtime.cache import ExecutableCache

    cache = ExecutableCache(unusable_dirs(tmp_path)["regular-file"])
    with pytest.warns(RuntimeWarning, match="cannot be used") as record:
        assert cache.directory is None
        assert cache.directory is None
    assert len(record) == 1
