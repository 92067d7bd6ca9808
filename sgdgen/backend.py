"""The only module that touches JAX's private names (`jax._src...`, `jaxlib._jax`,
`jaxlib.mlir._mlir_libs._jax_mlir_ext`, underscored arguments).

These names move between jax releases; keeping them here means one file to fix and
one test file (tests/test_backend.py) that says, by name, when they moved. Everything
above this module speaks in public types: text, numpy arrays, jax.Arrays, NamedShardings.
It sits below every stage of the pipeline (codegen and the passes use its MLIR helpers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


# ---- MLIR (jaxlib's bundled bindings) ---------------------------------------------------

def register_jax_dialects(registry: Any) -> None:
    """Adds every dialect JAX's own lowering knows (stablehlo, sdy, chlo, func, ...) to `registry`."""
    from jaxlib.mlir._mlir_libs import _jax_mlir_ext

    _jax_mlir_ext.register_dialects(registry)


def inlined_func_call(callee: Any, operands: Sequence[Any]) -> list[Any]:
    """Inlines `func.func` `callee` at the current insertion point; returns the values it yields."""
    from jaxlib.mlir._mlir_libs import _jax_mlir_ext

    return list(_jax_mlir_ext.inlined_func_call(callee, list(operands)))


# ---- PJRT -----------------------------------------------------------------------------

def devices_for(device_ids: Sequence[int]) -> list[Any]:
    """jax devices with these ids, in this order (raises naming the missing ids)."""
    import jax

    by_id = {d.id: d for d in jax.devices()}
    missing = [i for i in device_ids if i not in by_id]
    if missing:
        from sgdgen.errors import BackendError

        raise BackendError(
            f"devices {missing} do not exist (this process has {len(by_id)}: {sorted(by_id)}); on CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported"
        )
    return [by_id[i] for i in device_ids]


def compile_options(devices: Sequence[Any], *, strict_precision: bool = True) -> Any:
    """XLA compile options for one SPMD program over `devices` (partitions, no replicas).

    `strict_precision` turns XLA's excess precision off, so that every op rounds in the
    variable's dtype (SEMANTICS §6): needed for bfloat16/float16 chains, which XLA CPU
    otherwise computes in float32. A program of 32/64-bit variables only passes False: its
    HLO is the same, and the float32 code XLA generates with it is faster (bench/README.md)."""
    from jax._src import compiler, xla_bridge

    opts = compiler.get_compile_options(
        num_replicas=1,
        num_partitions=len(devices),
        device_assignment=np.array(devices).reshape(1, len(devices)),
        backend=xla_bridge.get_backend(),
    )
    opts.executable_build_options.use_spmd_partitioning = True
    if strict_precision:
        opts.env_option_overrides = [("xla_allow_excess_precision", False)]
    return opts


def compile_text(text: str, devices: Sequence[Any], *, strict_precision: bool = True) -> Any:
    """Compiles a StableHLO module (text) into a loaded executable on `devices` (see
    `compile_options` for `strict_precision`)."""
    from jax._src import xla_bridge
    from jax._src.lib import _jax as xc

    client = xla_bridge.get_backend()
    return client.compile_and_load(text, xc.DeviceList(tuple(devices)),
                                   compile_options(devices, strict_precision=strict_precision))


def execute(executable: Any, args: Sequence[Any], out_shardings: Sequence[Any], out_avals: Sequence[Any]) -> list[Any]:
    """Runs `executable` on jax.Arrays already laid out as it expects; returns jax.Arrays.

    The caller must have checked every argument (shape, dtype, sharding, devices, no
    array twice): on several devices a mismatch here ends the process (RUNTIME-NOTES Q1).
    """
    from jax._src.lib import _jax as xc

    results = executable.execute_sharded(list(args))
    handlers = [xc.array_result_handler(aval, sharding, committed=True, _skip_checks=True)
                for aval, sharding in zip(out_avals, out_shardings)]
    return list(results.consume_with_handlers(handlers))


def hlo_text(executable: Any) -> str:
    """The optimized HLO of a compiled executable (what XLA will run)."""
    return "\n".join(m.to_string() for m in executable.hlo_modules())


def shaped_array(shape: Sequence[int], dtype: Any) -> Any:
    from jax.core import ShapedArray

    return ShapedArray(tuple(shape), np.dtype(dtype))


def device_put(value: Any, sharding: Any) -> Any:
    """`jax.device_put` that keeps 64-bit dtypes (iterations is int64, as in tf_keras).

    JAX truncates int64 to int32 unless x64 is on; the step's state must keep its
    dtype, so the transfer runs with x64 enabled just for this call.
    """
    import jax

    with jax.enable_x64(True):
        return jax.device_put(value, sharding)


def input_output_aliases(executable: Any) -> dict[int, int]:
    """{result index: argument index} from the compiled HLO's input_output_alias table.

    jaxlib 0.10.2 has no public accessor for the table (the HloModule proto is opaque without
    XLA's protobuf definitions), so it is read from the module's text, which XLA prints as
    `input_output_alias={ {0}: (0, {}, may-alias), ... }`."""
    import re

    text = executable.hlo_modules()[0].to_string()
    start = text.find("input_output_alias={")
    if start < 0:
        return {}
    i, depth = start + len("input_output_alias="), 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            break
    table = text[i:j + 1]
    # A single (non-tuple) result has the empty index `{}`.
    return {int(out or 0): int(param) for out, param in re.findall(r"\{(\d*)\}:\s*\((\d+),", table)}


def memory_stats(executable: Any) -> dict[str, int]:
    """XLA's compiled memory statistics (bytes): arguments, outputs, aliases, temporaries."""
    s = executable.get_compiled_memory_stats()
    return {k: int(getattr(s, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "alias_size_in_bytes", "temp_size_in_bytes",
                                            "generated_code_size_in_bytes")}


def cache_key_material(devices: Sequence[Any], *, strict_precision: bool = True) -> bytes:
    """Everything besides the module text that decides a compiled executable: the serialized
    compile options (device assignment and precision included), the platform and its version,
    jaxlib's version."""
    fp = platform_fingerprint()
    ids = ",".join(f"{d.platform}:{d.id}" for d in devices)
    return b"\0".join([compile_options(devices, strict_precision=strict_precision).SerializeAsString(), ids.encode(),
                        repr(sorted(fp.items())).encode()])


def open_file_cache(path: str) -> Any:
    """JAX's own on-disk LRU store (`jax._src.lru_cache.LRUCache`, unbounded) in `path`: `get(key)` and
    `put(key, bytes)`, with its locking and atomic writes. sgdgen keeps its executables in a directory of
    its own instead of switching on the user's JAX persistent cache (a global setting)."""
    from jax._src import lru_cache

    return lru_cache.LRUCache(str(path), max_size=-1)


def compress(blob: bytes) -> bytes:
    """Compresses a serialized executable as JAX's persistent cache does (zstandard, else zlib)."""
    from jax._src import compilation_cache

    return compilation_cache.compress_executable(blob)


def decompress(blob: bytes) -> bytes:
    from jax._src import compilation_cache

    return compilation_cache.decompress_executable(blob)


def serialize_executable(executable: Any) -> bytes:
    """The executable as bytes, for the current platform and jaxlib only."""
    from jax._src import xla_bridge

    return bytes(xla_bridge.get_backend().serialize_executable(executable))


def deserialize_executable(blob: bytes, devices: Sequence[Any]) -> Any:
    from jax._src import xla_bridge
    from jax._src.lib import _jax as xc

    return xla_bridge.get_backend().deserialize_executable(blob, xc.DeviceList(tuple(devices)),
                                                           compile_options(devices))


def platform_fingerprint() -> dict[str, str]:
    """What a serialized executable is tied to: platform, its version, jaxlib."""
    import jax
    import jaxlib
    from jax._src import xla_bridge

    backend = xla_bridge.get_backend()
    return {"platform": backend.platform, "platform_version": str(backend.platform_version),
            "jaxlib": jaxlib.__version__, "jax": jax.__version__}
