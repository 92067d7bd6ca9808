"""Where compiled steps come from: memory, sgdgen's on-disk store, or a fresh compile.

`ExecutableCache` owns both levels and its counters; nothing about it is hidden module
state. In memory it keeps at most `max_entries` executables (least recently used go
first). On disk it keeps serialized executables in a directory of its own
(`$SGDGEN_CACHE_DIR`, default `~/.cache/sgdgen/xla`; `SGDGEN_CACHE_DIR=""` turns it off),
stored through JAX's own LRU file store, keyed by the lowered module, the compile options
and device assignment, the platform and jaxlib: a second process loads what the first
compiled. The user's JAX configuration (its persistent compilation cache included) is
never changed. A directory that cannot be used costs one warning, and sgdgen runs
without the disk level.

One process-wide instance serves by default (`default_cache()`); pass another to
`StepProgram.executable(cache=...)` to keep a separate one (tests do).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgdgen import backend
from sgdgen.frontend.spec import numpy_dtype
from sgdgen.runtime import cpu_kernels

if TYPE_CHECKING:
    from sgdgen.runtime.executable import StepExecutable
    from sgdgen.runtime.program import StepProgram

_UNSET: Any = object()


@dataclass
class CacheStats:
    """How each executable was obtained, for tests and benchmarks."""

    compiles: int = 0
    disk_hits: int = 0
    memory_hits: int = 0
    seconds: list[float] = field(default_factory=list)  # time to obtain each non-memory executable


def needs_strict_precision(program: StepProgram) -> bool:
    """Whether `program` has a 16-bit variable, whose ops XLA must not widen (SEMANTICS §6)."""
    return any(numpy_dtype(v.dtype).itemsize == 2 for v in program.variables)


def default_cache_dir() -> str | None:
    """`$SGDGEN_CACHE_DIR`, or `~/.cache/sgdgen/xla`; None when SGDGEN_CACHE_DIR is set to ""."""
    env = os.environ.get("SGDGEN_CACHE_DIR")
    if env == "":
        return None
    return env or str(Path.home() / ".cache" / "sgdgen" / "xla")


class ExecutableCache:
    """Compiled steps by program signature, bounded in memory, optionally persisted on disk."""

    def __init__(self, directory: str | os.PathLike[str] | None = _UNSET, *, max_entries: int = 64):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._memory: OrderedDict[Any, StepExecutable] = OrderedDict()
        self._lock = threading.Lock()
        self._directory = default_cache_dir() if directory is _UNSET else (
            None if directory is None else str(directory))
        self._store: Any = _UNSET  # opened on first use

    @property
    def directory(self) -> str | None:
        """The on-disk directory in use, or None (disabled, or unusable)."""
        self._disk()
        return self._directory

    def _disk(self) -> Any:
        if self._store is _UNSET:
            self._store = None
            if self._directory is not None:
                try:
                    self._store = backend.open_file_cache(self._directory)
                    if not os.access(self._directory, os.W_OK | os.X_OK):
                        self._store = None
                        raise PermissionError(f"no write permission on {self._directory}")
                except OSError as e:
                    warnings.warn(f"sgdgen: the executable cache directory {self._directory!r} cannot be used "
                                  f"({e.strerror or e}); running without an on-disk cache, so each process compiles "
                                  "its steps. Set SGDGEN_CACHE_DIR to a writable "
                                  "directory, or to \"\" to turn it off.", RuntimeWarning, stacklevel=4)
                    self._directory = None
        return self._store

    def get(self, program: StepProgram) -> StepExecutable:
        """The compiled step of `program`: from memory, from disk, or compiled (and stored)."""
        from sgdgen.runtime.executable import StepExecutable

        sig = program.signature
        with self._lock:
            hit = self._memory.get(sig)
            if hit is not None:
                self._memory.move_to_end(sig)
                self.stats.memory_hits += 1
                return hit
        devices = backend.devices_for(program.mesh.device_ids)
        strict = needs_strict_precision(program)
        t0 = time.perf_counter()
        store = self._disk()
        key = exe = None
        if store is not None:
            key = hashlib.sha256(program.lowered_text.encode() + b"\0" + cpu_kernels.cache_key_material(devices, strict_precision=strict))
            key = "sgdgen-" + key.hexdigest()
            exe = self._load(store, key, devices)
        if exe is not None:
            self.stats.disk_hits += 1
        else:
            exe = cpu_kernels.compile_text(program.lowered_text, devices, strict_precision=strict)
            self.stats.compiles += 1
            if store is not None:
                self._save(store, key, exe)
        self.stats.seconds.append(time.perf_counter() - t0)
        step = StepExecutable.wrap(exe, program.abi, program.mesh)
        self.put(program, step)
        return step

    def _load(self, store: Any, key: str, devices: Any) -> Any:
        try:
            blob = store.get(key)
            return None if blob is None else cpu_kernels.deserialize_executable(backend.decompress(blob), devices)
        except Exception as e:  # a damaged entry is a miss, never a failed step
            warnings.warn(f"sgdgen: ignoring an unreadable entry of the executable cache ({e})", RuntimeWarning,
                          stacklevel=4)
            return None

    def _save(self, store: Any, key: str, exe: Any) -> None:
        try:
            store.put(key, backend.compress(backend.serialize_executable(exe)))
        except Exception as e:
            warnings.warn(f"sgdgen: could not write to the executable cache in {self._directory!r} ({e}); "
                          "the step runs, but the next process compiles again", RuntimeWarning, stacklevel=4)

    def put(self, program: StepProgram, step: StepExecutable) -> None:
        """Makes `step` the executable of `program` (e.g. one loaded from an artifact)."""
        with self._lock:
            self._memory[program.signature] = step
            self._memory.move_to_end(program.signature)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)

    def clear(self) -> None:
        """Forgets the compiled steps held in memory (the on-disk store stays)."""
        with self._lock:
            self._memory.clear()

    def __len__(self) -> int:
        return len(self._memory)


_DEFAULT: ExecutableCache | None = None


def default_cache() -> ExecutableCache:
    """The process-wide cache that `sgdgen.SGD` uses unless given another."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ExecutableCache()
    return _DEFAULT


def set_default_cache(cache: ExecutableCache) -> ExecutableCache:
    """Replaces the process-wide cache; returns the previous one (tests restore it)."""
    global _DEFAULT
    previous, _DEFAULT = default_cache(), cache
    return previous
