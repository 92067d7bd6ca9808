"""Mesh, Layout and VarSpec: the DTensor vocabulary of sgdgen and its conversions.

A `Mesh` names device axes; a `Layout` says, per tensor dimension, which mesh axes
shard it (DTensor `sharding_specs`, or a `PartitionSpec`); a `VarSpec` is one
variable's name, shape, dtype and layout. They convert to the three forms the
pipeline needs: `#sdy.sharding` text for the generator, the `mhlo.sharding`
string for HLO, and `jax.sharding.NamedSharding` for the runtime.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgdgen.dtypes import MLIR_ELEMENT_TYPES, canonical_dtype, numpy_dtype
from sgdgen.errors import SpecError

UNSHARDED = "unsharded"

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Mesh:
    """Named device axes with sizes, and the device ids laid out on them (row-major)."""

    axes: tuple[tuple[str, int], ...]
    device_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        names = [a for a, _ in self.axes]
        for name, size in self.axes:
            if not isinstance(name, str) or not _AXIS_NAME.match(name):
                raise SpecError(f"mesh axis name {name!r} is not an identifier; use letters, digits and '_'")
            if name == UNSHARDED:
                raise SpecError(f"mesh axis may not be called {UNSHARDED!r}: that word means 'not sharded' in a layout")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise SpecError(f"mesh axis {name!r} has size {size!r}; sizes are positive integers")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SpecError(f"mesh axis {sorted(dup)[0]!r} is given twice; axis names must be unique")
        n = self.size
        if not self.device_ids:
            object.__setattr__(self, "device_ids", tuple(range(n)))
        elif len(self.device_ids) != n:
            raise SpecError(f"mesh {self} has {n} positions but {len(self.device_ids)} device ids were given")
        elif len(set(self.device_ids)) != n:
            raise SpecError("mesh device ids must be distinct")

    # ---- constructors -------------------------------------------------------------
    def __init__(self, axes: Mesh | str | Mapping[str, int] | Iterable[tuple[str, int]] | Any | None = (),
                 device_ids: Sequence[int] = ()):
        """One constructor for every form a user may have: "batch=2,model=4", {"batch": 2},
        a `jax.sharding.Mesh`, a Keras 3 `keras.distribution.DeviceMesh`, another Mesh,
        (name, size) pairs, or None / () for the one-device mesh. A jax or Keras mesh keeps
        its device order; `device_ids` (row-major) overrides it for the other forms."""
        items, ids = _axes_and_ids(axes)
        if device_ids:
            ids = tuple(device_ids)
        object.__setattr__(self, "axes", items)
        object.__setattr__(self, "device_ids", tuple(int(d) for d in ids))
        self.__post_init__()

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """Parses "batch=2,model=4" (an empty string is the 1-device mesh with no axes)."""
        return cls(_parse_axes(text))

    @classmethod
    def from_jax(cls, mesh: Any) -> Mesh:
        """From a `jax.sharding.Mesh`, keeping its device order."""
        return cls(mesh)

    @classmethod
    def of(cls, mesh: Mesh | str | Mapping[str, int] | Any | None) -> Mesh:
        """`Mesh(mesh)`, but a Mesh is returned as it is."""
        return mesh if isinstance(mesh, Mesh) else cls(mesh)

    # ---- queries ------------------------------------------------------------------
    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def size(self) -> int:
        return math.prod(s for _, s in self.axes)

    def axis_size(self, name: str) -> int:
        return self.shape[name]

    def __str__(self) -> str:
        return ",".join(f"{a}={s}" for a, s in self.axes)

    def to_json(self) -> dict[str, Any]:
        return {"axes": [[a, s] for a, s in self.axes], "device_ids": list(self.device_ids)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Mesh:
        return cls(tuple((a, s) for a, s in d["axes"]), d.get("device_ids", ()))

    def sdy_mesh_text(self, name: str = "mesh") -> str:
        """`sdy.mesh @mesh = <["batch"=2, "model"=4]>`.

        Device ids are not part of the program: the runtime compiles with this mesh's
        device order as the device assignment, so partition k runs on `device_ids[k]` and
        the same module serves any permutation of devices.
        """
        axes = ", ".join(f'"{a}"={s}' for a, s in self.axes)
        return f"sdy.mesh @{name} = <[{axes}]>"

    def to_jax(self, devices: Sequence[Any] | None = None) -> Any:
        """A `jax.sharding.Mesh` over this mesh's device ids (from `jax.devices()` by default)."""
        import jax

        by_id = {d.id: d for d in (devices if devices is not None else jax.devices())}
        missing = [i for i in self.device_ids if i not in by_id]
        if missing:
            raise SpecError(
                f"mesh {self} needs devices {missing} but only {sorted(by_id)} exist; on CPU set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
            )
        devs = np.array([by_id[i] for i in self.device_ids], dtype=object).reshape([s for _, s in self.axes])
        return jax.sharding.Mesh(devs, self.axis_names)


def _parse_axes(text: str) -> tuple[tuple[str, int], ...]:
    axes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise SpecError(f"mesh entry {part!r} is not NAME=SIZE; write a mesh as \"batch=2,model=4\"")
        axes.append((name.strip(), int(size)))
    return tuple(axes)


def _device_id(device: Any) -> int:
    """A device's id: a jax Device's `.id`, or N of Keras' "cpu:N" strings."""
    if hasattr(device, "id"):
        return int(device.id)
    text = str(device)
    tail = text.rpartition(":")[2]
    if not tail.isdigit():
        raise SpecError(f"mesh device {text!r} is neither a jax Device nor a 'platform:N' name")
    return int(tail)


def _axes_and_ids(source: Any) -> tuple[tuple[tuple[str, int], ...], tuple[int, ...]]:
    """(axes, device ids) from any mesh form `Mesh(...)` takes; () ids mean 0..n-1."""
    if source is None:
        return (), ()
    if isinstance(source, Mesh):
        return source.axes, source.device_ids
    if isinstance(source, str):
        return _parse_axes(source), ()
    if isinstance(source, Mapping):
        return tuple((k, v) for k, v in source.items()), ()
    if hasattr(source, "devices") and hasattr(source, "axis_names"):
        # jax.sharding.Mesh (shape: a name -> size mapping) or keras.distribution.DeviceMesh (shape: a tuple)
        shape = source.shape
        sizes = list(shape.values()) if isinstance(shape, Mapping) else list(shape)
        names = list(source.axis_names)
        if len(names) != len(sizes):
            raise SpecError(f"mesh {source!r} has axis names {names} but shape {sizes}")
        ids = tuple(_device_id(d) for d in np.asarray(source.devices, dtype=object).flat)
        return tuple((str(n), int(s)) for n, s in zip(names, sizes)), ids
    try:
        pairs = tuple((a, s) for a, s in source)
    except (TypeError, ValueError):
        raise SpecError(
            f"cannot make a mesh from {type(source).__name__} {source!r}; pass \"batch=2,model=4\", "
            "a dict {\"batch\": 2, \"model\": 4}, a jax.sharding.Mesh or a keras.distribution.DeviceMesh"
        ) from None
    return pairs, ()


@dataclass(frozen=True)
class Layout:
    """Per tensor dimension, the mesh axes that shard it (major to minor); () = unsharded.

    Built from DTensor `sharding_specs` (`["unsharded", "model"]`), or from a
    `jax.sharding.PartitionSpec` (which may put two axes on one dimension).
    """

    dims: tuple[tuple[str, ...], ...]
    mesh: Mesh = field(compare=True)

    def __init__(self, sharding_specs: Sequence[Any] | Any, mesh: Mesh | Any):
        mesh = Mesh.of(mesh)
        specs = tuple(sharding_specs)
        dims = []
        for s in specs:
            if s is None or s == UNSHARDED:
                dims.append(())
            elif isinstance(s, str):
                dims.append((s,))
            elif isinstance(s, (tuple, list)):
                dims.append(tuple(str(a) for a in s))
            else:
                raise SpecError(f"layout entry {s!r} is not a mesh axis name, {UNSHARDED!r} or a tuple of axes")
        for i, axes in enumerate(dims):
            for a in axes:
                if a not in mesh.shape:
                    raise SpecError(
                        f"layout names mesh axis {a!r} on dimension {i}, but the mesh has axes "
                        f"{list(mesh.axis_names)}; use one of those or '{UNSHARDED}'"
                    )
        object.__setattr__(self, "dims", tuple(dims))
        object.__setattr__(self, "mesh", mesh)

    @classmethod
    def replicated(cls, mesh: Mesh | Any, rank: int) -> Layout:
        """Every dimension unsharded (DTensor `Layout.replicated`)."""
        return cls([UNSHARDED] * rank, mesh)

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def sharding_specs(self) -> list[str | tuple[str, ...]]:
        """DTensor-style specs (a tuple where two axes share a dimension)."""
        return [UNSHARDED if not d else (d[0] if len(d) == 1 else d) for d in self.dims]

    @property
    def used_axes(self) -> tuple[str, ...]:
        return tuple(a for d in self.dims for a in d)

    @property
    def replicated_axes(self) -> tuple[str, ...]:
        """Mesh axes over which this layout holds duplicate copies."""
        used = set(self.used_axes)
        return tuple(a for a in self.mesh.axis_names if a not in used)

    def shards(self, dim: int) -> int:
        """How many pieces dimension `dim` is cut into."""
        return math.prod(self.mesh.axis_size(a) for a in self.dims[dim])

    def local_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one device's shard of a tensor of `shape`."""
        return tuple(n // self.shards(i) for i, n in enumerate(shape))

    def validate(self, shape: Sequence[int], what: str) -> None:
        """Raises `SpecError` naming `what` if this layout cannot lay out `shape`."""
        if len(shape) != self.rank:
            raise SpecError(
                f"{what}: layout {self.sharding_specs} has rank {self.rank} but the shape {list(shape)} has rank "
                f"{len(shape)}; give one entry per dimension ('{UNSHARDED}' or a mesh axis)"
            )
        seen: set[str] = set()
        for i, axes in enumerate(self.dims):
            for a in axes:  # every axis is on the mesh: Layout checks that at construction
                if a in seen:
                    raise SpecError(f"{what}: mesh axis {a!r} is used twice in layout {self.sharding_specs}; "
                                    "an axis may shard one dimension only")
                seen.add(a)
            k = self.shards(i)
            if shape[i] % k:
                raise SpecError(
                    f"{what}: dimension {i} of size {shape[i]} is not divisible by {k} "
                    f"(mesh axes {list(axes)}); pad the dimension to a multiple of {k} or leave it '{UNSHARDED}'"
                )

    # ---- conversions -----------------------------------------------------------------
    def sdy_text(self, mesh_name: str = "mesh") -> str:
        """`#sdy.sharding<@mesh, [{}, {"model"}]>`."""
        dims = ", ".join("{" + ", ".join(f'"{a}"' for a in d) + "}" for d in self.dims)
        return f"#sdy.sharding<@{mesh_name}, [{dims}]>"

    def hlo_sharding_text(self) -> str:
        """The `mhlo.sharding` string, e.g. `{devices=[1,4,2]0,4,1,5,2,6,3,7 last_tile_dim_replicate}`.

        Its numbers are partition indices (positions in the mesh), which the device
        assignment maps to device ids, as in HLO.
        """
        if not self.used_axes:
            return "{replicated}"
        names = list(self.mesh.axis_names)
        order = [names.index(a) for a in self.used_axes] + [names.index(a) for a in self.replicated_axes]
        tiles = [self.shards(i) for i in range(self.rank)]
        rep = math.prod(self.mesh.axis_size(a) for a in self.replicated_axes)
        arr = np.arange(self.mesh.size).reshape([s for _, s in self.mesh.axes]).transpose(order)
        dims = tiles + ([rep] if rep > 1 else [])
        ids = ",".join(str(int(x)) for x in arr.reshape(-1))
        tail = " last_tile_dim_replicate" if rep > 1 else ""
        return "{devices=[" + ",".join(map(str, dims)) + "]" + ids + tail + "}"

    def partition_spec(self) -> Any:
        """A `jax.sharding.PartitionSpec`."""
        from jax.sharding import PartitionSpec

        return PartitionSpec(*[None if not d else (d[0] if len(d) == 1 else d) for d in self.dims])

    def named_sharding(self, jax_mesh: Any | None = None) -> Any:
        """A `jax.sharding.NamedSharding` on this layout's mesh (or the given jax Mesh)."""
        from jax.sharding import NamedSharding

        if jax_mesh is None:
            return _default_named_sharding(self)
        return NamedSharding(jax_mesh, self.partition_spec())


@functools.lru_cache(maxsize=4096)
def _default_named_sharding(layout: Layout) -> Any:
    """One NamedSharding object per layout: the runtime compares shardings every step."""
    from jax.sharding import NamedSharding

    return NamedSharding(_default_jax_mesh(layout.mesh), layout.partition_spec())


@functools.lru_cache(maxsize=64)
def _default_jax_mesh(mesh: Mesh) -> Any:
    return mesh.to_jax()


#: XLA holds dimensions, element counts and byte sizes as int64; a shape beyond it aborts the compile.
INT64_MAX = 2**63 - 1
#: The most bytes one device's shard may take: 2**47 = 128 TiB, the user half of a 48-bit virtual
#: address space (x86-64 with 4-level paging, AArch64 with 48-bit VAs), the largest mapping a CPU
#: process can make on the common platforms; accelerators hold far less (an H200 has 141 GB).
MAX_SHARD_BYTES = 2**47


def check_addressable(shape: Sequence[int], dtype: str, layout: Layout, what: str) -> None:
    """Raises `SpecError` naming `what` if a variable of `shape` cannot exist on this platform.

    Checked before anything is generated: XLA aborts the process (SIGABRT) when a shape's
    element count or byte size overflows int64 (e.g. `[2**62]` float32 or `[2**40, 2**40]`),
    and a shard beyond `MAX_SHARD_BYTES` can never be allocated. State and gradients take
    several such buffers, so this is the bound on one variable, not a promise that it fits.
    """
    itemsize = numpy_dtype(dtype).itemsize
    elements = math.prod(shape)
    too_long = [i for i, n in enumerate(shape) if n > INT64_MAX]
    if too_long:
        raise SpecError(
            f"{what}: dimension {too_long[0]} of shape {list(shape)} is larger than int64 (2**63 - 1), the most "
            "XLA can represent; use a smaller shape"
        )
    if elements * itemsize > INT64_MAX:
        raise SpecError(
            f"{what}: shape {list(shape)} has {elements} elements ({dtype}: {elements * itemsize} bytes), more than "
            f"the int64 sizes XLA can represent (2**63 - 1); no device can hold it. Use a smaller shape"
        )
    shard_bytes = math.prod(layout.local_shape(shape)) * itemsize
    if shard_bytes > MAX_SHARD_BYTES:
        raise SpecError(
            f"{what}: shape {list(shape)} ({dtype}) puts {shard_bytes} bytes on each device (layout "
            f"{layout.sharding_specs}), more than the 2**47 bytes (128 TiB) a 48-bit address space can map; "
            "shard it over more devices or use a smaller shape"
        )


@dataclass(frozen=True)
class VarSpec:
    """One variable as the compiler sees it: name, global shape, dtype, layout, decay flag."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: Layout
    decay: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"variable name must be a non-empty string, got {self.name!r}")
        what = f"variable {self.name!r}"
        try:
            shape = tuple(int(n) for n in self.shape)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{what}: shape {self.shape!r} is not a list of integers") from e
        if any(n < 0 for n in shape):
            raise SpecError(f"{what}: shape {list(shape)} has a negative dimension")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, what=what))
        self.layout.validate(shape, what)
        check_addressable(shape, self.dtype, self.layout, what)

    @classmethod
    def create(cls, name: str, shape: Sequence[int], dtype: Any, mesh: Mesh,
               layout: Layout | Sequence[Any] | None = None, decay: bool = True) -> VarSpec:
        """Convenience: layout from specs (None = replicated) on `mesh`."""
        if layout is None:
            layout = Layout.replicated(mesh, len(shape))
        elif not isinstance(layout, Layout):
            try:
                layout = Layout(layout, mesh)
            except SpecError as e:
                raise SpecError(f"variable {name!r}: {e}") from None
        return cls(name, tuple(shape), dtype, layout, decay)

    @property
    def mlir_element_type(self) -> str:
        return MLIR_ELEMENT_TYPES[self.dtype]

    @property
    def mlir_type(self) -> str:
        """`tensor<8x16xf32>` (global shape)."""
        return tensor_type(self.shape, self.mlir_element_type)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize

    @property
    def class_key(self) -> tuple[Any, ...]:
        """Variables with equal keys share the stage functions of the generated module."""
        return (self.shape, self.dtype, self.layout.dims)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                             "layout": self.layout.sharding_specs}
        if not self.decay:
            d["decay"] = False
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], mesh: Mesh, *, where: str = "variable") -> VarSpec:
        """From a VARS.json entry; errors name the entry and the field."""
        if not isinstance(d, Mapping):
            raise SpecError(f"{where}: expected an object with name, shape, dtype, layout; got {type(d).__name__}")
        unknown = set(d) - {"name", "shape", "dtype", "layout", "decay"}
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: name, shape, dtype, layout, decay")
        for key in ("name", "shape", "dtype"):
            if key not in d:
                named = f" ({d['name']!r})" if "name" in d else ""
                raise SpecError(f"{where}{named}: missing field {key!r}")
        shape = d["shape"]
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise SpecError(f"{where} ({d['name']!r}): field 'shape' must be a list of integers, got {shape!r}")
        layout = d.get("layout")
        if layout is not None and not isinstance(layout, list):
            raise SpecError(f"{where} ({d['name']!r}): field 'layout' must be a list, got {layout!r}")
        decay = d.get("decay", True)
        if not isinstance(decay, bool):
            raise SpecError(f"{where} ({d['name']!r}): field 'decay' must be true or false, got {decay!r}")
        return cls.create(d["name"], shape, d["dtype"], mesh, layout, decay)


def tensor_type(shape: Sequence[int], element_type: str) -> str:
    """MLIR ranked tensor type text: `tensor<8x16xf32>`, `tensor<f32>` for a scalar."""
    return "tensor<" + "".join(f"{n}x" for n in shape) + element_type + ">"
