"""sgdgen's optional CPU kernels (csrc/), called through XLA's FFI by CPU executables.

The library is built at install (setup.py) and loaded here on first use, which registers its
FFI targets with JAX for the CPU platform. Every executable sgdgen builds goes through this
module (`compile_text`, `deserialize_executable`; the `sgdgen_step` lowering calls `rewrite`):
for CPU devices the `sgd-cpu-kernels` pass swaps float32 norm sums for kernel
calls and `sgd-cpu-update` each large float32 variable's update for one call. The portable `step.mlirbc`, `jax.export` and other platforms never see a call.

Without the library (no C++ compiler at install) or with `SGDGEN_CPU_KERNELS=0`, `rewrite`
returns its text unchanged and XLA's own reduce and fusions run: same contract (SEMANTICS §6),
slower (docs/numerics.md §3a-§3b). `fingerprint()` names the library in use ("" for none) so that cache
keys and artifacts tell executables with and without kernel calls apart.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sgdgen import backend

#: set to 0 to compile without sgdgen's kernels (XLA's own code only)
ENV = "SGDGEN_CPU_KERNELS"
#: the FFI targets the library defines (passes/cpu_kernels.py inserts calls of them)
TARGETS = ("sgdgen_sum_squares_f32", "sgdgen_sgd_update_f32")
#: the rewrite run on a CPU module (sgdgen.passes.cpu_kernels)
PIPELINE = "builtin.module(sgd-cpu-kernels,sgd-cpu-update)"


def library_path() -> Path | None:
    """The built kernel library: beside this module (an installed or editable package), else the
    installed distribution's (sgdgen imported from a source checkout beside a non-editable install,
    as CI's test children do: one process must not see other compile options than its parent)."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_cpu_kernels{suffix}"
        if candidate.is_file():
            return candidate
    return _installed_library()


def _installed_library() -> Path | None:
    from importlib import metadata

    names = {f"_cpu_kernels{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES}
    # every "sgdgen" on the path: a checkout's own sgdgen.egg-info (left by an in-tree build) comes first
    for dist in metadata.distributions(name="sgdgen"):
        for f in dist.files or ():
            if f.name in names and f.parent.name == "runtime":
                path = Path(str(f.locate())).resolve()
                if path.is_file():
                    return path
    return None


def enabled_by_environment() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _load() -> str:
    """Loads the library and registers its targets once; its fingerprint, "" when unavailable."""
    path = library_path()
    if path is None:
        return ""
    import jax

    lib = ctypes.cdll.LoadLibrary(str(path))
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return "sgdgen-cpu-kernels-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fingerprint() -> str:
    """The kernel library CPU executables are compiled with ("" when none is used)."""
    return _load() if enabled_by_environment() else ""


def available() -> bool:
    """Whether CPU modules get kernel calls (library built and loaded, not disabled)."""
    return bool(fingerprint())


def register() -> None:
    """Makes the targets known to XLA before an executable that may call them is deserialized."""
    fingerprint()


@functools.lru_cache(maxsize=64)
def _rewritten(text: str) -> str:
    from sgdgen.codegen.pipeline import run_pipeline

    return run_pipeline(text, PIPELINE)


def rewrite(text: str) -> str:
    """`text` with kernel calls where they pay, for compiling on CPU; unchanged without kernels."""
    if not available() or "xf32>" not in text:  # both kernels take float32 arrays
        return text
    return _rewritten(text)


def fingerprint_for(devices: Sequence[Any]) -> str:
    """The kernel library an executable for `devices` is compiled with ("" off CPU or without one)."""
    return fingerprint() if backend.on_cpu(devices) else ""


def compile_text(text: str, devices: Sequence[Any], *, strict_precision: bool = True) -> Any:
    """`backend.compile_text`, the module given its kernel calls first when `devices` are CPUs."""
    if backend.on_cpu(devices):
        text = rewrite(text)
    return backend.compile_text(text, devices, strict_precision=strict_precision)


def deserialize_executable(blob: bytes, devices: Sequence[Any]) -> Any:
    """`backend.deserialize_executable`, the kernels' targets registered first (the executable may call them)."""
    if backend.on_cpu(devices):
        register()
    return backend.deserialize_executable(blob, devices)


def compile_options_summary(devices: Sequence[Any]) -> dict[str, Any]:
    """`backend.compile_options_summary` plus the kernel library: what decides the compiled code."""
    return {**backend.compile_options_summary(devices), "cpu_kernels": fingerprint_for(devices)}


def cache_key_material(devices: Sequence[Any], *, strict_precision: bool = True) -> bytes:
    """`backend.cache_key_material` plus the kernel library (an executable with calls differs)."""
    return (backend.cache_key_material(devices, strict_precision=strict_precision) + b"\0"
            + fingerprint_for(devices).encode())
