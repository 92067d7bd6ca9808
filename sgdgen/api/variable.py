"""`sgdgen.Variable`: a named jax.Array laid out on a mesh (the DVariable of DTensor).

The optimizer updates variables in place: their buffers are donated to the compiled
step and replaced by its results, so `Variable.value` is always the live array and an
array read from it before a step is deleted after it (JAX's donation contract).

With flat buckets (`SGD(buckets=True)`) a small variable is a VIEW of a `FlatBuffer` the
optimizer owns: `value` is its slice of the buffer (one jitted slice, computed on the first
read after the buffer changed and cached until it changes again), `numpy()` a slice of
the buffer's host copy, and writes (`assign`) go into the buffer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sgdgen import backend
from sgdgen.frontend.buckets import slices
from sgdgen.frontend.zero import unpad
from sgdgen.frontend.spec import Layout, Mesh, SpecError, canonical_dtype, numpy_dtype

_ids = itertools.count()


class FlatBuffer:
    """One flat 1-D array that several Variables view (a bucket's values, momenta or averages).

    `members[k] = (offset, size, shape)`: view k is elements [offset, offset + size) reshaped.
    `bind` takes a new array (a step's result): every cached view value is dropped.
    """

    def __init__(self, array: Any, members: Sequence[tuple[int, int, tuple[int, ...]]], shardings: Sequence[Any]):
        self.members = tuple(members)
        self.shardings = tuple(shardings)  # each view's sharding (its variable's layout)
        self.array = array
        self._values: list[Any] = [None] * len(self.members)
        self._host: np.ndarray | None = None
        self._misses = 0  # view reads since the last bind that were not cached
        self._sweeps = 0  # binds after which the views were read in turn (more than one miss)
        self._cpu: bool | None = None
        self._unpack_key: tuple[Any, ...] | None = None  # the whole-buffer unpack's key (fixed layout)

    def bind(self, array: Any) -> None:
        """The buffer's new array (no copy); the views' cached values are invalidated."""
        self.array = array
        self._values = [None] * len(self.members)
        self._host = None
        self._misses = 0

    def value(self, k: int) -> Any:
        """View k's jax.Array, cached until the next `bind`. A read slices one view (one jitted
        slice with the offset an argument: one compile per view shape, ~10-40 us a call). A second
        read after a change means the views are being read in turn (a forward pass): from the
        second such step on, every view is sliced at once by one jitted call, once that program
        exists. It is compiled in the background (XLA takes seconds for a program of 400 slices,
        which would otherwise land on an early step); until then reads slice one by one."""
        v = self._values[k]
        if v is None:
            self._misses += 1
            if self._misses == 2 and len(self.members) > 2:
                self._sweeps += 1  # one more step whose views are read in turn
            if self._misses > 1 and len(self.members) > 2 and self._sweeps > 1:  # not in a one-step process
                whole = self._whole(self.array, wait=False)
                if whole is not None:
                    self._values = [a if a is not None else b for a, b in zip(self._values, whole(self.array))]
                    return self._values[k]
            if self._sweeps < 2 and self._on_cpu():
                # early steps on CPU: host views copied into arrays of their own (~10 us a view), no
                # compile, which a fresh process would pay on its first step (copies: a placed view
                # could share the bucket's memory, which the next step donates). From the second miss
                # on the views are read in turn: every one not yet placed is placed now.
                self._place_from_host([j for j, x in enumerate(self._values) if x is None]
                                      if self._misses > 1 and len(self.members) > 2 else [k])
                return self._values[k]
            offset, size, shape = self.members[k]
            v = self._values[k] = _slicer(size, shape, self.shardings[k])(self.array, np.int32(offset))
        return v

    def _place_from_host(self, views: Sequence[int]) -> None:
        """Views `views` placed from their slices of `host()`, copied into buffers of their own."""
        arrays = backend.put_host(slices(self.host(), [self.members[j] for j in views]),
                                  [self.shardings[j] for j in views])
        for j, a in zip(views, arrays):
            self._values[j] = a

    def _on_cpu(self) -> bool:
        """Whether the buffer lives on CPU devices this process holds whole (host views are free)."""
        if self._cpu is None:
            sharding = self.array.sharding
            self._cpu = bool(getattr(self.array, "is_fully_addressable", True)) and all(
                d.platform == "cpu" for d in sharding.device_set)
        return self._cpu

    def unpack(self, flat: Any) -> list[Any]:
        """Every view's array from `flat` (this buffer's array, or one laid out like it, e.g. its
        gradient): one jitted call of static slices, compiled once per layout of views."""
        return list(self._whole(flat, wait=True)(flat))

    def _whole(self, flat: Any, *, wait: bool) -> Any:
        """The compiled `flat -> every view` program for this buffer's layout of views; with
        `wait=False`, None while it still compiles in the background (sgdgen.runtime.background).
        Its key is made once: asked on every uncached read while it compiles, it must not hash
        every view's offset and sharding each time."""
        from sgdgen.runtime import background

        if self._unpack_key is None:
            self._unpack_key = ("unpack", self.members, self.shardings, tuple(flat.shape), str(flat.dtype),
                                flat.sharding)
        members = self.members
        return background.compiled(self._unpack_key, lambda x: tuple(slices(x, members)),
                                   lambda: [background.abstract(flat)], wait=wait, out_shardings=self.shardings)

    def host(self) -> np.ndarray:
        """The buffer on the host (on CPU `np.asarray` shares its memory), cached until `bind`."""
        if self._host is None:
            self._host = np.asarray(self.array)
        return self._host

    def numpy(self, k: int) -> np.ndarray:
        """View k on the host: a slice of `host()`, no device work."""
        return slices(self.host(), self.members[k:k + 1])[0]

    def write(self, values: dict[int, np.ndarray]) -> None:
        """Sets several views at once (host arrays of their shapes and the buffer's dtype): one
        host copy of the buffer, one transfer, however many views change."""
        new = np.array(self.host(), copy=True)
        for k, v in values.items():
            offset, size, _ = self.members[k]
            new[offset:offset + size] = np.reshape(np.asarray(v), (-1,))
        self.bind(backend.device_put(new, self.array.sharding))  # a copy of its own: the step donates it


_slicers: dict[tuple[Any, ...], Any] = {}


def _slicer(size: int, shape: tuple[int, ...], sharding: Any) -> Any:
    """A jitted `buffer[offset:offset + size].reshape(shape)` with the offset a runtime argument,
    so one compile serves every view of that size and shape (not one per view)."""
    key = (size, shape, sharding)
    fn = _slicers.get(key)
    if fn is None:
        import jax

        fn = _slicers[key] = jax.jit(lambda b, o: jax.lax.dynamic_slice(b, (o,), (size,)).reshape(shape),
                                     out_shardings=sharding)
    return fn


_ONE_DEVICE = Mesh(())  # a variable's mesh when none is given


@functools.lru_cache(maxsize=256)
def _replicated(mesh: Mesh, rank: int) -> Layout:
    """The replicated Layout of this rank on `mesh`, one object per (mesh, rank): a Layout is
    immutable, and 400 variables need not build (and keep) 400 equal ones."""
    return Layout.replicated(mesh, rank)


def _dtype(dtype: Any, name: str | None) -> np.dtype:
    """A float dtype sgdgen can update, or an integer one (a counter such as `iterations`,
    which the optimizer holds but never updates with gradients)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is not None and dt.kind in "iu":
        return dt
    return numpy_dtype(canonical_dtype(dtype, what=f"variable {name!r}"))


def _canonical_name(name: str | None, default: str) -> tuple[str, str]:
    """(TF-style name with ':0', shared name without it)."""
    base = name if name else default
    if base.endswith(":0"):
        base = base[:-2]
    return f"{base}:0", base


class Variable:
    """A mutable, named array with a mesh layout.

    Args:
      initial_value: anything `np.asarray` accepts, or a jax.Array (copied: the
        variable owns its buffer, which the optimizer donates every step).
      layout: a `Layout`, DTensor `sharding_specs` (with `mesh`), or None (replicated).
      name: TF-style; `.name` gets a ':0' suffix as tf.Variable's does (SEMANTICS decision 6).
      mesh: the mesh, when `layout` is given as specs or omitted (default: one device).
      dtype: optional dtype to cast to. Floating dtypes are what the optimizer updates; an
        integer variable (a step counter) may exist, but `SGD` refuses to update it.
      trainable: kept for Keras compatibility.
      constraint: optional function of the variable's array returning an array of the same
        shape (e.g. `lambda w: w * (w >= 0)`, Keras' NonNeg). As in tf_keras, the optimizer
        applies it to the variable after every step that updates it (a jitted JAX function);
        `assign` does not apply it.
    """

    def __init__(self, initial_value: Any, *, layout: Layout | Any = None, name: str | None = None,
                 mesh: Mesh | Any = None, dtype: Any = None, trainable: bool = True,
                 constraint: Any = None):
        if constraint is not None and not callable(constraint):
            raise TypeError(f"variable {name!r}: `constraint` must be a callable (array -> array) or None. "
                            f"Received: constraint={constraint!r}")
        host = np.asarray(initial_value) if not hasattr(initial_value, "sharding") else initial_value
        if isinstance(initial_value, (float, list, tuple)) and host.dtype == np.float64:
            host = host.astype(np.float32)  # Python floats default to floatx (float32), as tf.Variable
        dt = _dtype(dtype if dtype is not None else host.dtype, name)
        self.name, self._shared_name = _canonical_name(name, "Variable")
        if isinstance(layout, Layout):
            lay = layout
        else:
            m = Mesh.of(mesh) if mesh is not None else _ONE_DEVICE
            lay = _replicated(m, len(np.shape(host))) if layout is None else Layout(layout, m)
        lay.validate(tuple(np.shape(host)), f"variable {self._shared_name!r}")
        self.layout = lay
        self.trainable = trainable
        self._unique_id = next(_ids)
        self.constraint = constraint
        self._plan: Any = None  # a weight-update-sharded slot's padding (sgdgen.frontend.zero), set by SGD.build
        self._view: FlatBuffer | None = None  # the flat bucket's buffer when a view of one (view `_view_index` of it)
        self._value = self._place(host, dt)

    @classmethod
    def view(cls, buffer: FlatBuffer, k: int, *, name: str, layout: Layout) -> Variable:
        """A variable that is view `k` of `buffer` (an optimizer slot in a flat bucket); its shape
        and dtype are the buffer's for that view."""
        var = cls.__new__(cls)
        var.name, var._shared_name = _canonical_name(name, "Variable")
        var.layout, var.trainable, var.constraint, var._plan = layout, True, None, None
        var._unique_id = next(_ids)
        var._view_of(buffer, k)
        return var

    def _view_of(self, buffer: FlatBuffer, k: int) -> None:
        """Makes this variable view `k` of `buffer` (its own buffer is dropped)."""
        self._view, self._view_index = buffer, k  # two fields, no tuple: a build makes one view per variable and slot
        self._value = None

    @property
    def _value(self) -> Any:
        a = self._array
        if a is None and self._view is not None:
            return self._view.value(self._view_index)
        return a

    @_value.setter
    def _value(self, array: Any) -> None:
        self._array = array

    # ---- the array ---------------------------------------------------------------------
    def _place(self, value: Any, dtype: np.dtype) -> Any:
        """The variable's own buffer for `value`: a jax.Array is copied device to device (it may
        span other processes, whose shards this one cannot read), anything else from the host."""
        if hasattr(value, "sharding") and np.dtype(value.dtype) == dtype:
            return backend.device_put(value, self.layout.named_sharding(), copy=True)
        # copied into a buffer of its own (host data always is): the variable owns it
        return backend.device_put(np.asarray(value, dtype=dtype), self.layout.named_sharding())

    @property
    def value(self) -> Any:
        """The current jax.Array (replaced, not mutated, by each optimizer step)."""
        return self._value

    def _bind(self, array: Any) -> None:
        """Takes a step's result as this variable's array (no copy: the optimizer's own
        in-place update; `assign` is the public, copying path)."""
        self._value = array

    def numpy(self) -> np.ndarray:
        """The value on the host; a padded (weight-update-sharded) slot shows its logical value."""
        if self._array is None and self._view is not None:
            return self._view.numpy(self._view_index)
        return unpad(self._plan, np.asarray(self._value))

    def assign(self, value: Any) -> Variable:
        """Sets a new value of the same shape (and dtype after casting)."""
        shape = tuple(np.shape(value))
        if shape != self.shape:
            raise SpecError(f"variable {self._shared_name!r}: cannot assign a value of shape {list(shape)} to a "
                            f"variable of shape {list(self.shape)}")
        if self._view is not None:
            self._view.write({self._view_index: np.asarray(value, dtype=self.dtype)})
        else:
            self._value = self._place(value, self.dtype)
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        if self._array is None and self._view is not None:
            return tuple(self._view.members[self._view_index][2])
        return tuple(self._value.shape)

    @property
    def dtype(self) -> np.dtype:
        if self._array is None and self._view is not None:
            return np.dtype(self._view.array.dtype)
        return np.dtype(self._value.dtype)

    @property
    def mesh(self) -> Mesh:
        return self.layout.mesh

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy() if self._view is not None else np.asarray(self._value)
        return a.astype(dtype) if dtype is not None else a

    def __repr__(self) -> str:
        return (f"<sgdgen.Variable '{self.name}' shape={self.shape} dtype={self.dtype} "
                f"layout={self.layout.sharding_specs}>")


@contextlib.contextmanager
def substituted(variables: Sequence[Variable], values: Sequence[Any]) -> Iterator[None]:
    """Reads of `variables` see `values` (e.g. JAX tracers) inside the block; restored after,
    also on error. This is how a zero-argument loss is differentiated with respect to them."""
    saved = [v._array for v in variables]  # None for a view of a flat bucket
    try:
        for v, x in zip(variables, values):
            v._value = x
        yield
    finally:
        for v, x in zip(variables, saved):
            v._value = x


def _binary(name: str, reflected: bool = False) -> Any:
    import operator

    op = getattr(operator, name)

    def method(self: Variable, other: Any) -> Any:
        other = other.value if isinstance(other, Variable) else other
        return op(other, self._value) if reflected else op(self._value, other)

    method.__name__ = f"__{'r' if reflected else ''}{name.rstrip('_')}__"
    return method


# Arithmetic reads the current value, so a zero-argument loss such as
# `lambda: (var ** 2) / 2` works with jax.grad (the optimizer swaps in tracers).
for _name in ("add", "sub", "mul", "truediv", "floordiv", "pow", "matmul", "mod"):
    setattr(Variable, f"__{_name}__", _binary(_name))
    setattr(Variable, f"__r{_name}__", _binary(_name, reflected=True))
Variable.__neg__ = lambda self: -self._value  # type: ignore[attr-defined]
Variable.__pos__ = lambda self: self._value  # type: ignore[attr-defined]
Variable.__getitem__ = lambda self, idx: self._value[idx]  # type: ignore[attr-defined]
