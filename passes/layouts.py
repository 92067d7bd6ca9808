"""Layout analysis for `sgd-insert-collectives`: which sharding every value of @main has.

Reads the module's one `sdy.mesh` (whatever its symbol name) and @main's argument and
result shardings, propagates layouts through the step (elementwise ops unify their
operands and results, `broadcast_in_dim` of a scalar and constants take the layout of
their users, reductions to a scalar end it), and checks everything the partitioner relies
on, before anything is changed: two shardings meeting in one op, an op that cannot be
partitioned, a reduction of a sharded value that is not a norm partial, a result laid out
differently from the value returned, a dimension not divisible by its axes, norm partials
not joined into one `sgdgen.norms` value.

Unreduced axes (`#sdy.sharding<..., unreduced={"batch"}>`: each device holds a partial sum)
are accepted on gradient arguments only (after `sgdgen.state_count`, rank >= 1), and only over
axes the gradient's variable is replicated on; `sgd-insert-collectives` sums them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy

from sgdgen.passes.attrs import NORM_PARTIAL, NORMS, SHARDING, STATE_COUNT
from sgdgen.passes.common import PassError, arg_attrs, body_ops, find_main, int_attr, symbol_name, top_ops

ELEMENTWISE = {
    f"stablehlo.{n}" for n in (
        "add subtract multiply divide remainder negate abs sqrt rsqrt maximum minimum power floor ceil "
        "exponential log cosine sine tanh convert compare select clamp and or not xor sign round_nearest_even is_finite"
    ).split()
}
SCALAR_ONLY = {"stablehlo.reshape", "stablehlo.concatenate", "stablehlo.slice", "stablehlo.partition_id",
               "stablehlo.all_reduce"}

#: Per dimension, the mesh axes it is sharded over (major to minor).
Layout = tuple[tuple[str, ...], ...]


class _Classes:
    """Union-find over SSA values: values in one class share one layout."""

    def __init__(self) -> None:
        self.parent: dict[ir.Value, ir.Value] = {}

    def find(self, v: ir.Value) -> ir.Value:
        self.parent.setdefault(v, v)
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: ir.Value, b: ir.Value) -> None:
        self.parent[self.find(a)] = self.find(b)


def rank(v: ir.Value) -> int:
    """The rank of a ranked tensor value, 0 for anything else."""
    t = v.type  # the bindings return types already downcast
    return t.rank if isinstance(t, ir.RankedTensorType) else 0


@dataclass(frozen=True)
class MeshInfo:
    """The module's mesh: its symbol name and axes [(name, size), ...] in order."""

    name: str
    axes: tuple[tuple[str, int], ...]

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def device_count(self) -> int:
        return math.prod(s for _, s in self.axes)


def mesh_info(module: ir.Operation) -> MeshInfo:
    """The one `sdy.mesh` of the module, any symbol name; explicit device_ids are refused."""
    meshes = [op for op in top_ops(module) if op.name == "sdy.mesh"]
    if not meshes:
        raise PassError("the module has no sdy.mesh; declare the device mesh (sdy.mesh @mesh = <[...]>)", module)
    if len(meshes) > 1:
        raise PassError(f"expects exactly one sdy.mesh, found {len(meshes)}; partition a module with one mesh",
                        meshes[-1])
    attr = sdy.MeshAttr(meshes[0].attributes["mesh"])
    axes = tuple((sdy.MeshAxisAttr(a).name, sdy.MeshAxisAttr(a).size) for a in attr.axes)
    if attr.device_ids and list(attr.device_ids) != list(range(math.prod(s for _, s in axes))):
        raise PassError("meshes with explicit device_ids are laid out by the runtime's device assignment; "
                        "declare the mesh without device_ids", meshes[0])
    return MeshInfo(symbol_name(meshes[0]) or "", axes)


def unreduced_axes(attr: ir.Attribute) -> tuple[str, ...]:
    """The axes a `#sdy.sharding` declares unreduced (its value is a partial sum over them)."""
    return tuple(sdy.AxisRefAttr(a).name for a in sdy.TensorShardingAttr(attr).unreduced_axes)


def _layout(attr: ir.Attribute, what: str, where: ir.Operation, mesh: MeshInfo, *,
            allow_unreduced: bool = False) -> Layout:
    sharding = sdy.TensorShardingAttr(attr)
    ref = sharding.mesh_or_ref
    if not isinstance(ref, ir.FlatSymbolRefAttr) or ref.value != mesh.name:
        raise PassError(f"{what} is sharded on {ref}, not on the module's mesh @{mesh.name}; refer to it by name",
                        where)
    if not allow_unreduced and unreduced_axes(attr):
        raise PassError(f"{what} has unreduced axes {list(unreduced_axes(attr))}; only gradient arguments may "
                        "arrive unreduced (a partial sum per device): give it a reduced sharding", where)
    sizes = mesh.sizes
    dims = []
    for d in sharding.dimension_shardings:
        axes = []
        for a in sdy.DimensionShardingAttr(d).axes:
            axis = sdy.AxisRefAttr(a)
            if axis.sub_axis_info is not None:
                raise PassError(f"{what} uses a sub-axis of {axis.name!r}; shard on whole mesh axes", where)
            if axis.name not in sizes:
                raise PassError(f"{what} is sharded on axis {axis.name!r}, which @{mesh.name} does not have "
                                f"(axes: {sorted(sizes)})", where)
            axes.append(axis.name)
        dims.append(tuple(axes))
    used = [a for d in dims for a in d]
    if len(set(used)) != len(used):
        raise PassError(f"{what} uses a mesh axis twice", where)
    return tuple(dims)


def local_shape(t: ir.Type, layout: Layout, mesh: MeshInfo, what: str, where: ir.Operation) -> list[int]:
    """The per-device shape of a tensor of type `t` laid out as `layout`."""
    shape = list(ir.RankedTensorType(t).shape)
    if len(layout) != len(shape):
        raise PassError(f"{what}: sharding has {len(layout)} dimensions but the type {t} has {len(shape)}", where)
    sizes = mesh.sizes
    local = []
    for i, (n, axes) in enumerate(zip(shape, layout)):
        k = math.prod(sizes[a] for a in axes)
        if n % k:
            raise PassError(f"{what}: dimension {i} of size {n} is not divisible by {k} (axes {list(axes)})", where)
        local.append(n // k)
    return local


def _propagate(ops: list[ir.Operation]) -> _Classes:
    classes = _Classes()
    for op in ops:
        name = op.name
        if name == "func.call":
            raise PassError("@main still calls stage functions; run sgd-fuse-step first", op)
        if name in ELEMENTWISE:
            tensors = [v for v in [*op.operands, *op.results] if rank(v) > 0]
            for v in tensors[1:]:
                classes.union(tensors[0], v)
        elif name in ("stablehlo.optimization_barrier", "stablehlo.all_reduce"):
            # an all_reduce of tensors (gradients summed over their unreduced axes) keeps their layout
            for a, r in zip(op.operands, op.results):
                if rank(a) > 0:
                    classes.union(a, r)
        elif name == "stablehlo.broadcast_in_dim":
            if rank(op.operands[0]) != 0:
                raise PassError("can only partition broadcasts of scalars", op)
        elif name == "stablehlo.reduce":
            if any(rank(r) != 0 for r in op.results):
                raise PassError("can only partition reductions to a scalar (a norm partial)", op)
        elif name in ("stablehlo.constant", "func.return") or name in SCALAR_ONLY:
            pass
        else:
            raise PassError(f"cannot partition {name}: the step is elementwise apart from its norm reductions", op)
    return classes


def _reductions_feeding_partials(ops: list[ir.Operation]) -> set[ir.Operation]:
    """Reduce ops that a norm partial is computed from (through scalar ops): their sums are
    completed across devices by the all_reduce; any other reduce of a sharded value is not."""
    found: set[ir.Operation] = set()
    visited: set[ir.Operation] = set()

    def walk(v: ir.Value) -> None:
        if isinstance(v.owner, ir.Block) or rank(v) > 0:
            return
        op = v.owner.operation
        if op in visited:
            return
        visited.add(op)
        if op.name == "stablehlo.reduce":
            found.add(op)
            return
        for operand in op.operands:
            walk(operand)

    for o in ops:
        if NORM_PARTIAL in o.attributes:
            if o.name == "stablehlo.reduce":
                found.add(o)
            for operand in o.operands:
                walk(operand)
    return found


@dataclass
class Analysis:
    """@main, its body, the mesh, the shardings and layouts of its signature and of every value."""

    main: ir.Operation
    ops: list[ir.Operation]  # the body, func.return last
    mesh: MeshInfo
    in_shardings: list[ir.Attribute]
    out_shardings: list[ir.Attribute]
    in_layouts: list[Layout]
    #: per argument, the axes it arrives unreduced over (only gradients have any)
    in_unreduced: list[tuple[str, ...]]
    classes: _Classes
    class_layout: dict[ir.Value, Layout]
    partials: list[ir.Operation]
    norms: list[ir.Operation]

    def value_layout(self, v: ir.Value) -> Layout:
        """The layout of a value: its class's, replicated when no argument reaches it, () for scalars."""
        r = rank(v)
        if r == 0:
            return ()
        found = self.class_layout.get(self.classes.find(v))
        return found if found is not None else tuple(() for _ in range(r))


def analyze(module: ir.Operation) -> Analysis:
    """Reads and checks the layout of every value of @main; changes nothing."""
    mesh = mesh_info(module)
    main = find_main(module)
    ops = body_ops(main)
    if any(o.name == "sdy.manual_computation" for o in ops):
        raise PassError("@main is already partitioned (it holds an sdy.manual_computation)", main)
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)

    def sharding(k: int, results: bool) -> ir.Attribute:
        d = arg_attrs(main, k, results)
        if d is None or SHARDING not in d:
            raise PassError(f"{'result' if results else 'argument'} {k} of @main has no {SHARDING}; give every "
                            "argument and result a #sdy.sharding (sgdgen emit does)", main)
        return d[SHARDING]

    in_types = list(ftype.inputs)  # once: each `ftype.inputs` builds the whole list (quadratic if indexed)
    in_sh = [sharding(k, False) for k in range(len(in_types))]
    out_sh = [sharding(k, True) for k in range(len(ftype.results))]
    state_count = int_attr(main, STATE_COUNT)

    def is_gradient(k: int) -> bool:  # by the calling convention: after the state, not a scalar
        return state_count is not None and k >= state_count and ir.RankedTensorType(in_types[k]).rank > 0

    in_layouts = [_layout(a, f"argument {k}", main, mesh, allow_unreduced=is_gradient(k)) for k, a in enumerate(in_sh)]
    in_unreduced = [unreduced_axes(a) for a in in_sh]
    out_layouts = [_layout(a, f"result {k}", main, mesh) for k, a in enumerate(out_sh)]

    classes = _propagate(ops)
    class_layout: dict[ir.Value, Layout] = {}
    first_arg: dict[ir.Value, int] = {}
    for k, arg in enumerate(main.regions[0].blocks[0].arguments):
        if rank(arg) == 0:
            continue
        root = classes.find(arg)
        if root in class_layout and class_layout[root] != in_layouts[k]:
            clash = [ax for ax in in_unreduced[k] if any(ax in d for d in class_layout[root])]
            if clash:
                raise PassError(f"argument {k} (a gradient) arrives unreduced over {clash}, but argument "
                                f"{first_arg[root]} (its variable) is sharded on {'it' if len(clash) == 1 else 'them'}"
                                f" ({list(class_layout[root])}): a gradient is a partial sum only over axes its "
                                "variable is replicated on; reduce-scatter it to the variable's layout first", main)
            raise PassError(f"arguments {first_arg[root]} and {k} are combined elementwise but sharded differently "
                            f"({list(class_layout[root])} vs {list(in_layouts[k])}); the step does not reshard", main)
        class_layout.setdefault(root, in_layouts[k])
        first_arg.setdefault(root, k)
    partials = [o for o in ops[:-1] if NORM_PARTIAL in o.attributes]
    norms = [o for o in ops[:-1] if NORMS in o.attributes]
    a = Analysis(main, ops, mesh, in_sh, out_sh, in_layouts, in_unreduced, classes, class_layout, partials, norms)

    # Only values in a class with a sharded layout constrain the ops that touch them.
    sharded = {root for root, layout in class_layout.items() if any(layout)}
    covered = _reductions_feeding_partials(ops[:-1]) if sharded else set()
    for o in ops[:-1] if sharded else ():
        if not any(rank(v) > 0 and classes.find(v) in sharded for v in [*o.operands, *o.results]):
            continue
        if o.name in SCALAR_ONLY:
            raise PassError(f"cannot partition {o.name} of a sharded value: only elementwise ops and norm "
                            "reductions touch sharded tensors", o)
        if o.name == "stablehlo.reduce" and o not in covered:
            raise PassError(f"a reduction over a sharded value must be a norm partial ({NORM_PARTIAL}) so "
                            "that its all_reduce is inserted; run sgd-fuse-step on a module sgdgen emit produced", o)
    ret = ops[-1]
    for k, v in enumerate(ret.operands):
        if a.value_layout(v) != out_layouts[k]:
            raise PassError(f"result {k} is declared {list(out_layouts[k])} but the value returned is laid out "
                            f"{list(a.value_layout(v))}; the step does not reshard", ret)
    for k, t in enumerate(ftype.inputs):
        local_shape(t, in_layouts[k], mesh, f"argument {k}", main)
    if partials and len(norms) != 1:
        raise PassError(f"norm partials are not joined into one {NORMS} value; run sgd-fuse-step first", partials[0])
    return a
