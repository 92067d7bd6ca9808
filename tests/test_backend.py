"""Contract of sgdgen.backend with the installed jax/jaxlib: every private name it relies on
still exists, named in the failure, so a jax upgrade that moves one fails here first (and
not as an AttributeError in the middle of a step). Plus: no other module uses private names.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (module, attribute) pairs sgdgen.backend uses; keep in step with the module.
PRIVATE = [
    ("jax._src.xla_bridge", "get_backend"),
    ("jax._src.compiler", "get_compile_options"),
    ("jax._src.lib", "_jax.DeviceList"),
    ("jax._src.lib", "_jax.array_result_handler"),
    ("jax._src.lib", "_jax.batched_device_put"),
    ("jax.sharding", "NamedSharding._addressable_device_assignment"),  # put_host's device order
    ("jax._src.lru_cache", "LRUCache"),
    ("jax._src.compilation_cache", "compress_executable"),
    ("jax._src.compilation_cache", "decompress_executable"),
    ("jaxlib.mlir._mlir_libs._jax_mlir_ext", "register_dialects"),
    ("jaxlib.mlir._mlir_libs._jax_mlir_ext", "inlined_func_call"),
    # the JAX-lowering section (the sgdgen_step primitive)
    ("jax.interpreters.mlir", "register_lowering"),
    ("jax.interpreters.mlir", "merge_mlir_modules"),
    ("jax.interpreters.mlir", "aval_to_ir_type"),
    ("jax._src.interpreters.mlir", "lower_with_sharding_in_types"),
    ("jax._src.dispatch", "apply_primitive"),
]


@pytest.mark.parametrize("module,name", PRIVATE, ids=[f"{m}.{n}" for m, n in PRIVATE])
def test_private_name_exists(module: str, name: str) -> None:
    obj = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(obj, part), f"{module}.{name} is gone in this jax/jaxlib: update sgdgen/backend.py"
        obj = getattr(obj, part)


def test_the_contract_lists_every_private_module_backend_imports() -> None:
    text = (ROOT / "sgdgen" / "backend.py").read_text()
    used = set(re.findall(r"from (jax\._src[\w.]*|jaxlib\.mlir\._mlir_libs) import (\w+)", text))
    listed = {m for m, _ in PRIVATE} | {m.rpartition(".")[0] for m, _ in PRIVATE}
    missing = [f"{m}.{n}" for m, n in used if m not in listed and f"{m}.{n}" not in {f"{a}.{b}" for a, b in PRIVATE}]
    assert not missing, f"backend imports {missing}; add them to PRIVATE in this test"


def test_no_other_module_uses_private_jax_names() -> None:
    pattern = re.compile(r"jax\._src|_jax_mlir_ext|jaxlib\._jax|from jax\.interpreters|_skip_checks")
    offenders = []
    for path in [*ROOT.joinpath("sgdgen").rglob("*.py"), *ROOT.joinpath("passes").rglob("*.py"),
                 *ROOT.joinpath("tests").rglob("*.py")]:
        if path.name in ("backend.py", "test_backend.py"):
            continue
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{k}: {line.strip()}")
    assert not offenders, "private JAX names outside sgdgen/backend.py:\n" + "\n".join(offenders)


def test_compile_execute_and_alias_table_on_a_tiny_module() -> None:
    """The PJRT path end to end: compile text, execute with donation, read the alias table."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sgdgen import backend

    text = """module @t attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%a: tensor<4xf32> {tf.aliasing_output = 0 : i32}, %b: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.add %a, %b : tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}"""
    devices = backend.devices_for([0])
    exe = backend.compile_text(text, devices)
    assert backend.input_output_aliases(exe) == {0: 0}
    sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), ("x",)), P())
    a = jax.device_put(np.ones(4, np.float32), sharding)
    b = jax.device_put(np.full(4, 2.0, np.float32), sharding)
    (out,) = backend.execute(exe, [a, b], [sharding], [backend.shaped_array((4,), np.float32)])
    np.testing.assert_array_equal(np.asarray(out), np.full(4, 3.0, np.float32))
    assert a.is_deleted() and not b.is_deleted()
    blob = backend.serialize_executable(exe)
    again = backend.deserialize_executable(blob, devices)
    assert backend.input_output_aliases(again) == {0: 0}


def test_missing_devices_name_the_flag() -> None:
    from sgdgen import backend
    from sgdgen.errors import BackendError

    with pytest.raises(BackendError, match="xla_force_host_platform_device_count"):
        backend.devices_for([0, 4096])


def test_lowering_context_and_compiled_program_fields_exist() -> None:
    """The private fields the primitive's lowering and check_in_place read: the lowering context's
    module, symbol table and axis context; a compiled program's kept arguments and hoisted constants."""
    import jax
    import jax.numpy as jnp
    from jax._src.interpreters import mlir as mlir_internal

    from sgdgen import backend

    for field in ("module", "symbol_table", "axis_context", "context", "platforms", "lowering_parameters"):
        assert field in mlir_internal.ModuleContext.__dataclass_fields__ or hasattr(
            mlir_internal.ModuleContext, field), f"ModuleContext.{field} is gone: update sgdgen/backend.py"
    assert "for_export" in mlir_internal.LoweringParameters.__dataclass_fields__, \
        "LoweringParameters.for_export is gone: update backend.lowering_for_cpu_executable"
    compiled = jax.jit(lambda unused, a: a + 1, donate_argnums=1).lower(jnp.ones(3), jnp.ones(2)).compile()
    assert hasattr(compiled._executable, "_kept_var_idx") and hasattr(compiled._params, "const_args")
    assert backend.kept_argument_indices(compiled) == [None, 0]  # the unused argument was dropped
    assert backend.input_output_aliases(compiled.runtime_executable()) == {0: 0}


def test_put_host_copies_every_layout_and_keeps_64_bit_dtypes() -> None:
    """`put_host` gives what jax.device_put gives (values, shardings, committed), in buffers of its
    own: an aligned NumPy array is not wrapped (jax.device_put wraps one on CPU), int64 stays int64.
    Replicated over every device and over one, and split (row blocks, columns, partly replicated)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sgdgen import backend

    devices = backend.devices_for(list(range(len(jax.devices()))))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, 1), ("x", "y"))
    raw = np.empty(64 * 16 + 16, np.float32)
    aligned = raw[(-raw.ctypes.data % 64) // 4:][:64 * 16].reshape(64, 16)  # 64-byte aligned
    aligned[:] = np.arange(aligned.size, dtype=np.float32).reshape(aligned.shape)
    counter = np.array(2**40 + 3, np.int64)
    mesh_t = jax.sharding.Mesh(np.array(devices).reshape(1, -1), ("x", "y"))
    mesh_2d = jax.sharding.Mesh(np.array(devices).reshape(2, -1), ("x", "y"))
    one = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
    shardings = [NamedSharding(mesh, P()), NamedSharding(one, P()), NamedSharding(mesh, P("x", None)),
                 NamedSharding(mesh_t, P(None, "y")), NamedSharding(mesh_2d, P("x", None))]
    got = backend.put_host([aligned] * len(shardings), shardings)
    want = [jax.device_put(aligned, s) for s in shardings]
    for g, w, s in zip(got, want, shardings):
        assert g.sharding == s and g.committed and g.shape == aligned.shape and g.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert [x.index for x in g.addressable_shards] == [x.index for x in w.addressable_shards]
    ours = {p for a in got for p in backend.buffer_pointers(a)}
    assert aligned.ctypes.data not in ours  # copied, never the NumPy memory
    aligned[0, 0] = -1.0  # and so not changed with it
    assert float(np.asarray(got[0])[0, 0]) == 0.0 and float(np.asarray(got[1])[0, 0]) == 0.0
    (wide,) = backend.put_host([counter], shardings[:1])
    assert wide.dtype == np.int64 and int(wide) == 2**40 + 3
    (shared,) = backend.put_host([aligned], shardings[1:2], share=True)  # read-only use: may wrap the memory
    np.testing.assert_array_equal(np.asarray(shared), aligned)
    if devices[0].platform == "cpu":
        assert backend.buffer_pointers(shared) == (aligned.ctypes.data,)
