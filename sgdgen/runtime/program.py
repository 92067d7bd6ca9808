"""One step program per (config, variables' signature, mesh), compiled once.

`StepProgram` holds everything that shapes the program; its stage-0 and lowered
texts are derived from it. `executable_for` returns a compiled `StepExecutable`
from, in order: this process's memory, JAX's persistent compilation cache on disk
(a second process loads instead of compiling), or a fresh compile.

Why JAX's persistent cache rather than a cache of our own: its key already covers
the module text, the compile options and device assignment, the jaxlib version and
the platform, it is shared with the user's own jit programs, and its eviction and
multi-process rules are maintained upstream. sgdgen only points it at a directory
(`SGDGEN_CACHE_DIR`, default ~/.cache/sgdgen/xla) when the user has not set one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sgdgen import backend
from sgdgen.codegen.abi import StepABI
from sgdgen.runtime.executable import StepExecutable
from sgdgen.frontend.spec import Mesh, VarSpec


@dataclass(frozen=True)
class StepProgram:
    """The inputs that determine one compiled step."""

    config: Any
    variables: tuple[VarSpec, ...]
    mesh: Mesh

    @cached_property
    def abi(self) -> StepABI:
        return StepABI.create(self.variables, self.mesh, use_ema=self.config.use_ema,
                              lr_input=not self.config.lr_is_schedule, optimizer_name=self.config.name)

    @cached_property
    def stage0_text(self) -> str:
        from sgdgen.codegen.generate import generate_text

        return generate_text(self.config, self.variables, self.mesh)

    @cached_property
    def lowered_text(self) -> str:
        from sgdgen.codegen.pipeline import run_pipeline

        return run_pipeline(self.stage0_text)

    @cached_property
    def key(self) -> str:
        """sha256 of the lowered program and the device assignment."""
        h = hashlib.sha256(self.lowered_text.encode())
        h.update(repr(self.mesh.device_ids).encode())
        return h.hexdigest()


@dataclass
class CacheStats:
    """Counters a test or a benchmark can read: how each executable was obtained."""

    compiles: int = 0
    disk_hits: int = 0
    memory_hits: int = 0
    seconds: list[float] = field(default_factory=list)


STATS = CacheStats()
_MEMORY: dict[str, StepExecutable] = {}  # by StepProgram.key (the lowered text)
_BY_SIGNATURE: dict[StepProgram, StepExecutable] = {}  # the per-step fast path: no text generated


def signature(program: StepProgram) -> StepProgram:
    """The program with a float learning rate normalised away: the rate is a runtime input,
    so programs that differ only in it share one executable and one cache entry."""
    config = program.config
    if not config.lr_is_schedule:
        config = dataclasses.replace(config, learning_rate=0.0)
    return StepProgram(config, program.variables, program.mesh)


def configure_persistent_cache(path: str | os.PathLike[str] | None = None) -> str | None:
    """Points JAX's persistent compilation cache at `path` unless the user already set one.

    Returns the directory in use (None when disabled with SGDGEN_CACHE_DIR="", or when the
    directory is unusable: then `usable_cache_dir` warns once and the step runs uncached).
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current and path is None:
        return current
    env = os.environ.get("SGDGEN_CACHE_DIR")
    if path is None and env == "":
        return None
    target = usable_cache_dir(path or env or Path.home() / ".cache" / "sgdgen" / "xla")
    if target is None:
        return None
    if target != current:
        jax.config.update("jax_compilation_cache_dir", target)
        # sgdgen's steps compile in well under a second; JAX skips caching those by default.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    return target


_UNUSABLE_WARNED: set[str] = set()


def usable_cache_dir(path: str | os.PathLike[str]) -> str | None:
    """`path` as a string once it is a directory this process can write (made if missing), or
    None with one warning per path: an unusable cache (a regular file, a read-only place such as
    /proc) must cost the cache, never the step, as JAX treats its own cache errors."""
    target = str(path)
    try:
        Path(target).mkdir(parents=True, exist_ok=True)
        if not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {target}")
        return target
    except OSError as e:
        if target not in _UNUSABLE_WARNED:
            _UNUSABLE_WARNED.add(target)
            warnings.warn(
                f"sgdgen: the compilation cache directory {target!r} cannot be used ({e.strerror or e}); running "
                "without the persistent cache, so each process compiles its steps. Point SGDGEN_CACHE_DIR at a "
                "writable directory, or set it to \"\" to turn the cache off.",
                RuntimeWarning, stacklevel=3,
            )
        return None


def executable_for(program: StepProgram) -> StepExecutable:
    """The compiled step of `program`, from memory, the persistent cache, or a compile."""
    sig = signature(program)
    cached = _BY_SIGNATURE.get(sig) or _MEMORY.get(program.key)
    if cached is not None:
        STATS.memory_hits += 1
        _BY_SIGNATURE[sig] = cached
        return cached
    configure_persistent_cache()
    devices = backend.devices_for(program.mesh.device_ids)
    t0 = time.perf_counter()
    exe, hit = backend.compile_cached(program.lowered_text, devices)
    STATS.seconds.append(time.perf_counter() - t0)
    if hit:
        STATS.disk_hits += 1
    else:
        STATS.compiles += 1
    step = StepExecutable.wrap(exe, program.abi, program.mesh)
    _MEMORY[program.key] = step
    _BY_SIGNATURE[sig] = step
    return step


def register_executable(program: StepProgram, step: StepExecutable) -> None:
    """Makes `step` (e.g. loaded from an artifact; `StepExecutable.wrap` has checked its
    aliasing) the executable of `program` in this process."""
    _MEMORY[program.key] = step
    _BY_SIGNATURE[signature(program)] = step


def clear_memory_cache() -> None:
    """Forgets this process's compiled steps (the on-disk cache stays)."""
    _MEMORY.clear()
    _BY_SIGNATURE.clear()

