"""`sgd-cpu-update{min-elements=65536}`: each large float32 variable's update becomes one FFI call.

Runs on the final (stage-1) module, and only when it is compiled for XLA CPU with sgdgen's
kernel library loaded (`sgdgen.runtime.cpu_kernels`); the portable `step.mlirbc` and every
other platform keep the plain StableHLO. XLA CPU (jaxlib 0.10) forms no multi-output loop
fusion: a variable's new momentum, weight and average are three loop fusions, each re-reading
what the one before wrote (40 bytes a parameter against 28). `sgdgen_sgd_update_f32`
(csrc/sgd_update.cc) reads each element once and writes each result once, in place.

The kernel computes one formula (its flags choose the clip mode, decay, Nesterov, EMA, the
overwrite and the non-finite skip; see `expected`), with the IR's float32 operations in the
IR's order. The pass rewrites a variable only where the elementwise IR that computes its
results IS that formula: it matches the IR's expression trees against `expected` for each
choice of flags (operands of add, multiply, maximum and minimum in either order, which IEEE
arithmetic does not tell apart), binding the formula's leaves to the IR's values (arrays of
the variable's shape, scalars broadcast to it, splat constants). So the kernel's results are the
IR's, bit for bit; an update of any other form, another element type, or under `min-elements`
elements is left to XLA. Results the step returns take an in-place alias to their operand
where @main donates that argument to that result (`tf.aliasing_output`), or where the operand
is a temporary nothing else reads.

A gradient that is a `stablehlo.concatenate` of 1-D float32 pieces (a flat bucket's gradient
built from its members' gradients, `StepABI` gradient segments) is passed as those pieces (the
flags' 7th word counts them): the kernel reads each member's gradient where it lies, and the
concatenate, once nothing else reads it, is erased instead of materialised.

Only local values are rewritten (`sgdgen.passes.locality`): one partition, or inside a
manual computation over every mesh axis.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass
from typing import Any

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo

from sgdgen.passes import register
from sgdgen.passes.common import count_option, guarded, module_of
from sgdgen.passes.locality import concat_pieces, defining_op, donated_to, local_blocks, splat_float

NAME = "sgd-cpu-update"
#: the FFI target (csrc/sgd_update.cc), registered by sgdgen.runtime.cpu_kernels
SGD_UPDATE_F32 = "sgdgen_sgd_update_f32"
#: a variable of fewer elements is left to XLA: a call and its pool wake-up cost more than a small loop
DEFAULT_MIN_ELEMENTS = 1 << 16
#: clip modes, as the kernel numbers them
CLIPS = ("none", "global_clipnorm", "clipnorm", "clipvalue")
#: the kernel's constants, in its order
CONSTANTS = ("wd", "mom", "keep", "take", "c", "c_neg")

_OPS = {"stablehlo.add": "add", "stablehlo.subtract": "sub", "stablehlo.multiply": "mul",
        "stablehlo.divide": "div", "stablehlo.maximum": "max", "stablehlo.minimum": "min",
        "stablehlo.negate": "neg", "stablehlo.select": "select"}
_COMMUTATIVE = {"add", "mul", "max", "min"}

# An expression: (op, operand, ...) with op one of _OPS' values, or a leaf:
# ("array", x), ("scalar", x), ("pred", x), ("const", x): x is a role name in `expected`,
# an ir.Value (or, for "const", a float32 bit pattern) in an IR term.
Expr = tuple


@dataclass(frozen=True)
class Flags:
    """One choice of the kernel's flags."""

    clip: int
    decay: bool
    nesterov: bool
    ema: bool
    overwrite: bool
    skip: bool

    def words(self) -> list[int]:
        return [self.clip, int(self.decay), int(self.nesterov), int(self.ema), int(self.overwrite), int(self.skip)]


def expected(f: Flags) -> dict[str, Expr]:
    """The kernel's results (csrc/sgd_update.cc), as expressions over its operands' roles."""
    g: Expr = ("array", "g")
    if f.clip == 1:
        g = ("mul", g, ("scalar", "s"))
    elif f.clip == 2:
        g = ("div", ("mul", g, ("const", "c")), ("scalar", "s"))
    elif f.clip == 3:
        g = ("max", ("min", g, ("const", "c")), ("const", "c_neg"))
    lr: Expr = ("scalar", "lr")
    w: Expr = ("array", "w")
    if f.decay:
        w = ("sub", w, ("mul", ("mul", w, ("const", "wd")), lr))
    step = ("mul", ("neg", g), lr)
    m = ("add", step, ("mul", ("array", "m"), ("const", "mom")))
    w = ("add", w, ("add", step, ("mul", m, ("const", "mom")))) if f.nesterov else ("add", w, m)
    out = {"w": w, "m": m}
    if f.ema:
        out["a"] = ("add", ("mul", ("const", "keep"), ("array", "a")), ("mul", ("const", "take"), w))
        if f.overwrite:
            out["w"] = ("select", ("pred", "due"), out["a"], w)
    if f.skip:
        out = {k: ("select", ("pred", "skip"), ("array", k), e) for k, e in out.items()}
    return out


def _flag_choices(clip: int, skip: bool) -> list[Flags]:
    """Every flag choice with this clip and skip, those with more results first (an EMA found
    beside the weight and momentum is part of the same call)."""
    return [Flags(clip, decay, nesterov, ema, overwrite, skip)
            for ema, overwrite in ((True, True), (True, False), (False, False))
            for decay, nesterov in itertools.product((True, False), repeat=2)]


def _splat_bits(v: ir.Value) -> int | None:
    """The float32 bit pattern of `v` when it is a float32 splat constant (any shape), else None."""
    value = splat_float(v, ir.F32Type.get())
    return None if value is None else struct.unpack("<I", struct.pack("<f", value))[0]


def _is_scalar(v: ir.Value, element: ir.Type) -> bool:
    t = ir.RankedTensorType(v.type)
    return t.rank == 0 and t.element_type == element


class _Terms:
    """The IR's expression trees over one variable shape, memoised per value."""

    def __init__(self, shape: ir.Type):
        self.shape = shape
        self.memo: dict[Any, Expr] = {}

    def __call__(self, v: ir.Value) -> Expr:
        if v in self.memo:
            return self.memo[v]
        term = self._build(v)
        self.memo[v] = term
        return term

    def _build(self, v: ir.Value) -> Expr:
        f32 = ir.F32Type.get()
        bits = _splat_bits(v)
        if bits is not None:
            return ("const", bits)
        op = defining_op(v)
        if op is not None and op.name == "stablehlo.broadcast_in_dim" and _is_scalar(op.operands[0], f32):
            bits = _splat_bits(op.operands[0])
            return ("const", bits) if bits is not None else ("scalar", op.operands[0])
        if op is None or op.name not in _OPS or v.type != self.shape:
            return ("array", v)
        name = _OPS[op.name]
        if name == "select":
            pred, on_true, on_false = op.operands
            if not _is_scalar(pred, ir.IntegerType.get_signless(1)):
                return ("array", v)
            return ("select", ("pred", pred), self(on_true), self(on_false))
        return (name, *map(self, op.operands))


def _match(want: Expr, have: Expr, binding: dict[str, Any]) -> dict[str, Any] | None:
    """`binding` extended so that `want` (roles) equals `have` (IR values), or None."""
    kind = want[0]
    if kind in ("array", "scalar", "pred", "const"):
        if have[0] != kind:
            return None
        role, value = want[1], have[1]
        if role in binding:
            return binding if binding[role] == value else None
        return {**binding, role: value}
    if have[0] != kind or len(have) != len(want):
        return None
    orders = [have[1:]]
    if kind in _COMMUTATIVE and have[1] != have[2]:
        orders.append((have[2], have[1]))
    for operands in orders:
        b: dict[str, Any] | None = binding
        for w, h in zip(want[1:], operands):
            b = _match(w, h, b)
            if b is None:
                break
        if b is not None:
            return b
    return None


@dataclass
class _Update:
    """A variable's update found in a block: its flags, the IR values of its roles, its results."""

    flags: Flags
    binding: dict[str, Any]
    results: dict[str, ir.Value]  # "w", "m", ["a"] -> the IR value the kernel replaces


def _candidates(block: ir.Block, threshold: int) -> list[ir.Value]:
    """Values the step returns (or all-gathers): float32, static, at least `threshold` elements,
    computed by an elementwise op in this block."""
    out: list[ir.Value] = []
    f32 = ir.F32Type.get()
    users = [op.operation for op in block.operations
             if op.operation.name in ("func.return", "sdy.return", "stablehlo.all_gather")]
    for user in users:
        for v in user.operands:
            op = defining_op(v)
            if op is None or op.name not in _OPS or op.block != block or v in out:
                continue
            t = ir.RankedTensorType(v.type)
            if t.element_type == f32 and t.has_static_shape and math.prod(t.shape) >= max(threshold, 1):
                out.append(v)
    return out


def _find(block: ir.Block, threshold: int) -> list[_Update]:
    """Each variable update in `block` that the kernel computes: a momentum candidate matched for
    a clip mode and skip, then its weight (and average) among the other candidates."""
    candidates = _candidates(block, threshold)
    terms: dict[Any, _Terms] = {}
    taken: set[Any] = set()
    found: list[_Update] = []
    for m_value in candidates:
        if m_value in taken:
            continue
        term = terms.setdefault(m_value.type, _Terms(m_value.type))
        others = [v for v in candidates if v not in taken and v != m_value and v.type == m_value.type]
        update = None
        for clip, skip in itertools.product(range(len(CLIPS)), (True, False)):
            for flags in _flag_choices(clip, skip):
                want = expected(flags)
                binding = _match(want["m"], term(m_value), {})
                if binding is None:
                    break  # the momentum's form depends on clip and skip only
                results = {"m": m_value}
                for role in ("w", "a") if flags.ema else ("w",):
                    for v in others:
                        if v in results.values():
                            continue
                        b = _match(want[role], term(v), binding)
                        if b is not None:
                            binding, results[role] = b, v
                            break
                    else:
                        break
                else:
                    update = _Update(flags, binding, results)
                    break
            if update is not None:
                break
        if update is not None:
            taken.update(update.results.values())
            found.append(update)
    return found


def _rewrite_one(block: ir.Block, u: _Update, module: ir.Operation) -> None:
    """Replaces the update's results by one kernel call."""
    f, b = u.flags, u.binding
    roles = ["w", "m", "a"] if f.ema else ["w", "m"]
    pieces = concat_pieces(b["g"]) or [b["g"]]  # a bucket's gradient as its members': read where they lie
    operands = [*pieces, *(b[r] for r in roles), b["lr"]]
    if f.clip in (1, 2):
        operands.append(b["s"])
    if f.overwrite:
        operands.append(b["due"])
    if f.skip:
        operands.append(b["skip"])
    results = [u.results[r] for r in roles]
    # after every operand's definition, before every result's first user
    order = {op.operation: k for k, op in enumerate(block.operations)}
    after = max((order.get(defining_op(v), -1) for v in operands if defining_op(v) is not None), default=-1)
    first_use = min(order[_user(use)] for r in results for use in r.uses)
    if after >= first_use:
        return
    where = ir.InsertionPoint(list(block.operations)[first_use].operation)  # where the results were needed
    constants = [b.get(name, 0) for name in CONSTANTS]
    with where, results[0].owner.location:
        call = stablehlo.CustomCallOp([r.type for r in results], operands, SGD_UPDATE_F32,
                                      backend_config=ir.StringAttr.get(""))
        call.attributes["mhlo.backend_config"] = ir.DictAttr.get(  # typed FFI, as jax.ffi.ffi_call
            {"flags": ir.DenseI64ArrayAttr.get(f.words() + ([len(pieces)] if len(pieces) > 1 else [])),
             "constants": ir.DenseI64ArrayAttr.get(constants)})
    dead = [defining_op(v) for v in results]
    for result, new in zip(results, call.results):
        result.replace_all_uses_with(new)
    _erase_dead(block, dead)
    # in place where @main donates the operand to the result, or the operand is a temporary only the
    # call reads; elsewhere the kernel copies the operand into the result first
    aliases = [stablehlo.OutputOperandAlias.get([k], len(pieces) + k, []) for k, role in enumerate(roles)
               if donated_to(b[role], call.results[k], module)
               or (defining_op(b[role]) is not None and len(list(b[role].uses)) == 1)]
    if aliases:
        call.attributes["output_operand_aliases"] = ir.ArrayAttr.get(aliases)


def _user(use: Any) -> ir.Operation:
    owner = use.owner
    return owner.operation if hasattr(owner, "operation") else owner


def _erase_dead(block: ir.Block, roots: list[ir.Operation]) -> None:
    """Erases `roots` and the pure ops only they used, once nothing uses them (users before producers)."""
    pure = set(_OPS) | {"stablehlo.broadcast_in_dim", "stablehlo.constant", "stablehlo.concatenate",
                        "stablehlo.reshape"}
    seen: set[ir.Operation] = set()
    todo = [op for op in roots if op is not None]
    while todo:
        op = todo.pop()
        if op in seen or op.name not in pure or op.block != block:
            continue
        seen.add(op)
        todo.extend(o for o in map(defining_op, op.operands) if o is not None)
    for op in reversed([o.operation for o in block.operations if o.operation in seen]):
        if not any(list(r.uses) for r in op.results):
            op.erase()


def _rewrite(op: Any, **options: str) -> None:
    """Replaces each large float32 variable's elementwise update by one call of the update kernel."""
    module = module_of(op)
    threshold = count_option(options, "min-elements", DEFAULT_MIN_ELEMENTS, module)
    for block in local_blocks(module):
        for update in _find(block, threshold):
            _rewrite_one(block, update, module)


run = register(NAME, "each float32 variable's update -> one XLA FFI kernel call (CPU executables only)",
               options=("min-elements",))(guarded(NAME, _rewrite))
