"""The only module that touches JAX's private names (`jax._src...`, `jaxlib._jax`,
`jaxlib.mlir._mlir_libs._jax_mlir_ext`, underscored arguments).

These names move between jax releases; keeping them here means one file to fix and
one test file (tests/test_backend.py) that says, by name, when they moved. Everything
above this module speaks in public types: text, numpy arrays, jax.Arrays, NamedShardings.
It sits below every stage of the pipeline (codegen and the passes use its MLIR helpers).
"""

from __future__ import annotations

import functools
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


def on_cpu(devices: Sequence[Any]) -> bool:
    """Whether `devices` are all XLA CPU devices."""
    return bool(devices) and all(d.platform == "cpu" for d in devices)


def compile_text(text: str, devices: Sequence[Any], *, strict_precision: bool = True) -> Any:
    """Compiles a StableHLO module (text) into a loaded executable on `devices` (see
    `compile_options` for `strict_precision`). sgdgen compiles through
    sgdgen.runtime.cpu_kernels.compile_text, which gives CPU modules their kernel calls."""
    from jax._src import xla_bridge
    from jax._src.lib import _jax as xc

    client = xla_bridge.get_backend()
    return client.compile_and_load(text, xc.DeviceList(tuple(devices)),
                                   compile_options(devices, strict_precision=strict_precision))


def result_handlers(out_shardings: Sequence[Any], out_avals: Sequence[Any]) -> list[Any]:
    """What turns an executable's result buffers into jax.Arrays of these avals and shardings:
    made once per executable and reused by every call (as JAX's own dispatch does), not one
    per result per step (1,201 for a 400-variable step)."""
    from jax._src.lib import _jax as xc

    return [xc.array_result_handler(aval, sharding, committed=True, _skip_checks=True)
            for aval, sharding in zip(out_avals, out_shardings)]


def execute(executable: Any, args: Sequence[Any], out_shardings: Sequence[Any], out_avals: Sequence[Any], *,
            handlers: Sequence[Any] | None = None) -> list[Any]:
    """Runs `executable` on jax.Arrays already laid out as it expects; returns jax.Arrays.
    `handlers`: `result_handlers(out_shardings, out_avals)`, made once by the caller.

    The caller must have checked every argument (shape, dtype, sharding, devices, no
    array twice): on several devices a mismatch here ends the process (RUNTIME-NOTES Q1).
    """
    results = executable.execute_sharded(list(args))
    if handlers is None:
        handlers = result_handlers(out_shardings, out_avals)
    return list(results.consume_with_handlers(list(handlers)))


def hlo_text(executable: Any) -> str:
    """The optimized HLO of a compiled executable (what XLA will run)."""
    return "\n".join(m.to_string() for m in executable.hlo_modules())


def shaped_array(shape: Sequence[int], dtype: Any) -> Any:
    from jax.core import ShapedArray

    return ShapedArray(tuple(shape), np.dtype(dtype))


def device_put(value: Any, sharding: Any, *, copy: bool = False) -> Any:
    """`jax.device_put` that keeps 64-bit dtypes (iterations is int64, as in tf_keras).

    JAX truncates int64 to int32 unless x64 is on; the step's state must keep its
    dtype, so the transfer runs with x64 enabled just for this call. With `copy`, a
    jax.Array gets fresh buffers even where its sharding already matches (a donated
    buffer must have one owner); this works where the array spans other processes.
    """
    import jax

    # Host data is always copied into buffers the runtime owns. On CPU, jax may otherwise wrap a
    # NumPy array's memory (zero copy): such a buffer cannot be donated in place, so its step result
    # lands elsewhere, and once the NumPy memory is freed and reused the executable's remembered
    # addresses (runtime/executable.py) would report two state arrays sharing one buffer.
    if not isinstance(value, jax.Array):  # jax.device_put(may_alias=False) still wraps aligned NumPy memory
        return put_host([value], [sharding])[0]
    return _jax_device_put(value, sharding, may_alias=False if copy else None)


def _jax_device_put(value: Any, sharding: Any, *, may_alias: bool | None) -> Any:
    import jax

    with jax.enable_x64(True):
        return jax.device_put(value, sharding, may_alias=may_alias)


#: above this, a copy to several devices goes through jax.device_put: jaxlib's forced-copy batched put
#: copies a large replicated array 5x slower (200 MB to 8 CPU devices: 6.0 s against 1.2 s), which made
#: 6,400 variables' buckets on a 2x4 mesh take 23 s to place
_BATCHED_PUT_MAX_BYTES = 1 << 20


def put_host(values: Sequence[Any], shardings: Sequence[Any], *, share: bool = False) -> list[Any]:
    """Host arrays as new jax.Arrays laid out by `shardings`, dtype kept (int64 too), each copied
    into buffers the runtime owns: jaxlib's batched put with `force_copy`, the call `jax.device_put`
    ends in (~10 us an array where `jax.device_put` takes ~40), which on CPU otherwise wraps a
    64-byte-aligned NumPy array's memory even with may_alias=False (such a state buffer is not
    donated in place). With `share`, an array nothing else holds may be wrapped instead (on CPU,
    when 64-byte aligned: no copy), for arrays that are only read, never donated. Only a replicated
    sharding this process holds whole takes that call (jaxlib 0.10.2 fails it on some partly
    replicated ones), and only for one device or up to `_BATCHED_PUT_MAX_BYTES`; others go through
    `jax.device_put` (a host copy first where the sharding is partial)."""
    from jax._src.lib import _jax as xc

    out = []
    for value, sharding in zip(values, shardings, strict=True):
        x = np.asarray(value)
        if not (sharding.is_fully_replicated and sharding.is_fully_addressable):
            out.append(_jax_device_put(np.array(x, copy=True), sharding, may_alias=None))  # a copy only it holds
            continue
        devices = list(sharding._addressable_device_assignment)
        if len(devices) > 1 and x.nbytes > _BATCHED_PUT_MAX_BYTES:
            out.append(_jax_device_put(x, sharding, may_alias=False))
            continue
        out.append(xc.batched_device_put(_host_aval(x.shape, x.dtype), sharding, [x] * len(devices), devices,
                                         True, not share, enable_x64=True))
    return out


@functools.lru_cache(maxsize=1024)
def _host_aval(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """One abstract value per shape and dtype for `put_host`'s arrays (immutable; jax's result
    handlers share one likewise): 400 variables make 4 objects, not 400, to create and collect."""
    return shaped_array(shape, dtype)


def buffer_pointers(array: Any, one_device: bool = False) -> tuple[int, ...]:
    """The device-memory address of each addressable shard of a jax.Array, in device order.

    Two arrays whose shards have one address share a buffer (an array rebuilt from another's
    shards, or a zero-copy transfer of a NumPy view of one); donating one of them to a step
    while the other is read ends the process on several devices (issue 16.4). `_arrays`
    (the shards' single-device arrays, without `addressable_shards`' Shard objects) is a
    third of the cost, and an array on one device is asked directly (a quarter of that: this runs
    for every gradient of every step, 6,400 for a flat bucket's segments); the public path is the
    fallback. `one_device`: the caller knows the array lives on one device (it checked its
    sharding), so not even the sharding is read."""
    if one_device:
        return (array.unsafe_buffer_pointer(),)
    sharding = getattr(array, "sharding", None)
    if sharding is not None and len(sharding.device_set) == 1:
        return (array.unsafe_buffer_pointer(),)
    shards = getattr(array, "_arrays", None)
    if shards is None:
        shards = [s.data for s in array.addressable_shards]
    return tuple(s.unsafe_buffer_pointer() for s in shards)


def copy_array(array: Any) -> Any:
    """A copy of a jax.Array in new buffers, with the same sharding (`may_alias=False`)."""
    import jax

    with jax.enable_x64(True):
        return jax.device_put(array, array.sharding, may_alias=False)


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


# ---- artifacts: compile options, serialized executables, what an executable was built for ----
# Used by sgdgen.io.artifact to bind a stored executable to its module and to check a
# deserialized one against the step's calling convention before it runs.

def compile_options_summary(devices: Sequence[Any]) -> dict[str, Any]:
    """The parts of `compile_options(devices)` that decide the compiled code, as plain JSON
    values (part of an artifact's executable fingerprint)."""
    opts = compile_options(devices)
    build = opts.executable_build_options
    return {"num_replicas": int(opts.num_replicas), "num_partitions": int(opts.num_partitions),
            "use_spmd_partitioning": bool(build.use_spmd_partitioning),
            "device_ids": [int(d.id) for d in devices],
            "env_option_overrides": [[str(k), str(v)] for k, v in opts.env_option_overrides]}


def executable_module_name(executable: Any) -> str:
    """The name of the (first) HLO module a loaded executable was compiled from."""
    return str(executable.hlo_modules()[0].name)


def executable_signature(executable: Any) -> tuple[list[tuple[tuple[int, ...], np.dtype, Any]],
                                                   list[tuple[tuple[int, ...], np.dtype, Any]]]:
    """(parameters, results) of a compiled SPMD executable, each a list of
    (per-device shape, dtype, HloSharding), read from the executable itself: its entry
    computation's program shape and `get_parameter_shardings` / `get_output_shardings`."""
    from jaxlib import _hlo

    module = executable.hlo_modules()[0]
    shape = _hlo.XlaComputation(module.as_serialized_hlo_module_proto()).program_shape()
    result = shape.result_shape()
    results = list(result.tuple_shapes()) if result.is_tuple() else [result]
    param_sh = executable.get_parameter_shardings() or [None] * len(shape.parameter_shapes())
    out_sh = executable.get_output_shardings() or [None] * len(results)

    def rows(shapes: Sequence[Any], shardings: Sequence[Any]) -> list[tuple[tuple[int, ...], np.dtype, Any]]:
        return [(tuple(int(d) for d in s.dimensions()), np.dtype(s.numpy_dtype()),
                 None if op is None else _hlo.HloSharding.from_proto(op)) for s, op in zip(shapes, shardings)]

    return rows(shape.parameter_shapes(), param_sh), rows(results, out_sh)


def sharding_matches(hlo_sharding: Any, sharding: Any, ndim: int) -> bool:
    """Whether an executable's HloSharding (from `executable_signature`) places an
    `ndim`-dimensional array as the jax `sharding` does. A one-device executable reports no
    shardings (None): that matches a sharding on one device only."""
    from jax._src import op_shardings

    if hlo_sharding is None:
        return len(sharding.device_set) == 1
    return bool(op_shardings.are_hlo_shardings_equal(hlo_sharding, sharding._to_xla_hlo_sharding(ndim)))


# ---- JAX lowering: a compiled module called from inside a user's program -------------------
# The step as a JAX primitive (sgdgen.runtime.primitive) is lowered by merging sgdgen's lowered
# module into the module JAX is building and calling its @main, as jax.export's own
# `call_exported` lowering does (jax/_src/export/_export.py). Everything below touches
# `jax.interpreters.mlir` (whose LoweringRuleContext / ModuleContext fields are JAX-internal),
# `jax._src.interpreters.mlir.lower_with_sharding_in_types`, `jax._src.dispatch.apply_primitive`
# and a compiled program's private `_executable._kept_var_idx` / `_params.const_args`.

def shardy_enabled() -> bool:
    """Whether JAX partitions with Shardy (`jax_use_shardy_partitioner`); sgdgen's modules need it."""
    import jax

    return bool(jax.config.jax_use_shardy_partitioner)


def define_eager_impl(primitive: Any) -> None:
    """Runs `primitive` outside any jit as JAX runs its own primitives: one cached jit of the bind."""
    import functools

    from jax._src import dispatch

    primitive.def_impl(functools.partial(dispatch.apply_primitive, primitive))


def lowering_device_count(ctx: Any) -> int:
    """How many devices the program being lowered runs on (its partitions)."""
    axis_context = ctx.module_context.axis_context
    if hasattr(axis_context, "num_devices"):  # ShardingContext: jit over shardings
        return int(axis_context.num_devices)
    mesh = getattr(axis_context, "mesh", None)  # SPMDAxisContext: inside a mesh context
    if mesh is not None:
        return int(mesh.size)
    from sgdgen.errors import BackendError

    raise BackendError(f"the step cannot be lowered inside {type(axis_context).__name__} (e.g. pmap or a "
                       "manual shard_map body); call it from jax.jit with sharded arrays instead")


def lowering_for_cpu_executable(ctx: Any) -> bool:
    """Whether the program being lowered is compiled here for CPU alone: not for `jax.export`
    (whose module must stay portable) nor for several platforms (ModuleContext.platforms and
    .lowering_parameters.for_export, private fields)."""
    module_ctx = ctx.module_context
    params = getattr(module_ctx, "lowering_parameters", None)
    return tuple(module_ctx.platforms) == ("cpu",) and params is not None and not params.for_export


def register_module_call_lowering(primitive: Any, module_text: Any, name: str) -> None:
    """Lowers `primitive` to a `func.call` of the @main of the module `module_text(ctx, **params)`
    (StableHLO text), merged into the module being lowered.

    Operands whose element type differs from @main's (an int32 step counter for an int64 one)
    are converted on the way in, results to the avals JAX expects on the way out, and in
    explicit-sharding mode each result carries its aval's sharding."""
    from jax._src.interpreters import mlir as mlir_internal
    from jax.interpreters import mlir
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import func, stablehlo

    def rule(ctx: Any, *operands: Any, **params: Any) -> list[Any]:
        module_ctx = ctx.module_context
        text = module_text(ctx, **params)
        with module_ctx.context:
            sub = ir.Module.parse(text)
        main = ir.SymbolTable(sub.operation)["main"]
        callee_type = main.type
        args = [x if x.type == t else stablehlo.convert(t, x) for x, t in zip(operands, callee_type.inputs)]
        callee = mlir.merge_mlir_modules(module_ctx.module, name, sub, dst_symtab=module_ctx.symbol_table)
        call = func.CallOp(callee_type.results, ir.FlatSymbolRefAttr.get(callee), args)
        results = []
        for out, aval in zip(call.results, ctx.avals_out):
            want = mlir.aval_to_ir_type(module_ctx, aval)
            out = out if out.type == want else stablehlo.convert(want, out)
            if getattr(aval, "sharding", None) is not None:
                out = mlir_internal.lower_with_sharding_in_types(ctx, out, aval)
            results.append(out)
        return results

    mlir.register_lowering(primitive, rule)


def kept_argument_indices(compiled: Any) -> list[int | None]:
    """For each flattened argument of a jax `Compiled`, the index of the executable's parameter
    that receives it (None when jit dropped it as unused); hoisted constants come first."""
    executable = compiled._executable
    offset = len(getattr(compiled._params, "const_args", ()))
    n = compiled.in_tree.num_leaves
    kept = getattr(executable, "_kept_var_idx", None)
    if kept is None:
        return [offset + i for i in range(n)]
    positions = sorted(int(i) for i in kept)
    where = {i: k for k, i in enumerate(positions)}
    return [where.get(offset + i) for i in range(n)]
