"""One emitter per rule of the step (SEMANTICS §4): each adds its stage functions and lines to @main.

`generate_text` runs them in the order of §4 over one `Step`, which holds what the rules
pass to each other: the argument of each ABI slot, the learning rate per element type,
the (clipped) gradient of each variable and the value that becomes each result.

    learning_rate -> overwrite_due -> nonfinite counts -> clipping (norm partials first) ->
    per variable: weight_decay -> update -> ema -> ema_overwrite -> counter -> skip
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sgdgen.codegen.abi import StepABI
from sgdgen.codegen.schedule_params import render_schedule
from sgdgen.codegen.templating import Builder, hex_literal
from sgdgen.dtypes import WIDE  # the wide type that accumulates each element type's norms
from sgdgen.frontend.spec import VarSpec, tensor_type

#: Where the int64 counters stop (they saturate instead of wrapping to negative).
INT64_MAX = 2 ** 63 - 1


def class_suffix(v: VarSpec) -> str:
    """Name of a variable class: `8x16xf32`, plus the layout when sharded: per dimension its
    axes joined by '.', or '0' when unsharded (no axis name starts with a digit), dimensions
    joined by '$' (no axis name holds one), so different layouts never share a name:
    `8x16xf32_0$model`, `16x16xf32_batch.model$0`. Variable names never enter symbols, so
    symbols stay unique and deterministic whatever the names."""
    s = "x".join([*map(str, v.shape), v.mlir_element_type])
    if v.layout.used_axes:
        s += "_" + "$".join(".".join(d) if d else "0" for d in v.layout.dims)
    return s


@dataclass
class Step:
    """What the rules share while @main is built."""

    config: Any
    variables: Sequence[VarSpec]
    abi: StepABI
    b: Builder = field(default_factory=Builder)
    arg: dict[tuple[str, int | None], str] = field(default_factory=dict)
    lr_in: dict[str, str] = field(default_factory=dict)  # element type -> this step's lr in it
    grads: dict[int, str] = field(default_factory=dict)
    results: dict[tuple[str, int | None], str] = field(default_factory=dict)
    due: str | None = None  # the i1 "overwrite this step" value, when EMA overwrites
    nonfinite: str | None = None  # the f32 count of non-finite gradient elements, with skip_nonfinite
    skip: str | None = None  # the i1 "skip this step" value, with skip_nonfinite

    def __post_init__(self) -> None:
        self.arg = {(s.role, s.var): f"%arg{k}" for k, s in enumerate(self.abi.inputs)}
        self.grads = {i: self.arg[("gradient", i)] for i in range(len(self.variables))}  # until segments join

    @property
    def iterations(self) -> str:
        return self.arg[("iterations", None)]


# ---- step-level rules ------------------------------------------------------------------------

def emit_gradient_segments(s: Step) -> None:
    """A gradient that arrives in segments (a flat bucket's, as its members' gradients) is their
    concatenate, flattened, in offset order: the bucket's gradient every rule reads. A CPU
    executable's kernels read the pieces themselves (sgd-cpu-kernels, sgd-cpu-update)."""
    pieces: dict[int, list[tuple[str, Any]]] = {}
    for k, slot in enumerate(s.abi.inputs):
        if slot.role == "gradient" and slot.segment is not None:
            pieces.setdefault(slot.var, []).append((f"%arg{k}", slot))
    for i, parts in pieces.items():
        v = s.variables[i]
        et = v.mlir_element_type
        flat = []
        for j, (arg, slot) in enumerate(parts):
            n = math.prod(slot.shape)
            if len(slot.shape) == 1:
                flat.append((arg, n))
                continue
            s.b.emit(f"%gseg{i}_{j} = stablehlo.reshape {arg} : ({slot.mlir_type}) -> {tensor_type((n,), et)}")
            flat.append((f"%gseg{i}_{j}", n))
        types = ", ".join(tensor_type((n,), et) for _, n in flat)
        s.b.emit(f"%grad{i} = stablehlo.concatenate {', '.join(a for a, _ in flat)}, dim = 0 : ({types}) -> "
                 f"{v.mlir_type}")
        s.grads[i] = f"%grad{i}"


def emit_learning_rate(s: Step) -> None:
    """§4.0: this step's learning rate, at iterations before the increment, in each element type."""
    if s.config.lr_is_schedule:
        s.b.functions["learning_rate"] = render_schedule(s.config.learning_rate)
        s.b.call(["%lr"], "learning_rate", [s.iterations], ["tensor<i64>"], ["tensor<f32>"])
        lr = "%lr"
    else:
        lr = s.arg[("learning_rate", None)]
    for et in dict.fromkeys(v.mlir_element_type for v in s.variables):
        if et == "f32":
            s.lr_in[et] = lr
        else:
            s.lr_in[et] = f"%lr_{et}"
            s.b.emit(f"%lr_{et} = stablehlo.convert {lr} : (tensor<f32>) -> tensor<{et}>")


def emit_overwrite_due(s: Step) -> None:
    """§4.10: whether this step overwrites the variables with their averages."""
    frequency = s.config.ema_overwrite_every if s.config.use_ema else None
    if frequency:
        s.b.stage("overwrite_due", "overwrite_due", frequency=int(frequency))
        s.b.call(["%due"], "overwrite_due", [s.iterations], ["tensor<i64>"], ["tensor<i1>"])
        s.due = "%due"


def _norm_partials(s: Step, global_norm: bool) -> list[str]:
    """One norm partial per variable, accumulated wide: l2_loss for the global norm, else sum(g*g)."""
    partials = []
    for i, v in enumerate(s.variables):
        et, t = v.mlir_element_type, v.mlir_type
        wt = WIDE[et]
        half = ("elementwise" if v.dtype == "float16" else "wide") if global_norm else None
        fn = s.b.stage(f"{'l2_loss' if half else 'norm_sq'}_{class_suffix(v)}", "norm_partial", t=t, wt=wt,
                       t_wide=tensor_type(v.shape, wt), half=half, half_value=hex_literal(0.5, v.dtype),
                       dims=", ".join(map(str, range(len(v.shape)))))
        s.b.call([f"%partial{i}"], fn, [s.grads[i]], [t], [f"tensor<{wt}>"])
        partials.append(f"%partial{i}")
    return partials


def _clip_by_norm(s: Step) -> None:
    """§4.5 clipnorm: each gradient scaled by its own norm."""
    partials = _norm_partials(s, global_norm=False)
    for i, v in enumerate(s.variables):
        t, et = v.mlir_type, v.mlir_element_type
        fn = s.b.stage(f"clip_norm_{class_suffix(v)}", "clip_norm", t=t, et=et, wt=WIDE[et],
                       c=hex_literal(s.config.clip_value, v.dtype))
        s.b.call([f"%g{i}_clipped"], fn, [s.grads[i], partials[i]], [t, f"tensor<{WIDE[et]}>"], [t])
        s.grads[i] = f"%g{i}_clipped"


def _clip_by_global_norm(s: Step) -> None:
    """§4.5 global_clipnorm: every gradient scaled by the norm of all of them (one dtype)."""
    partials = _norm_partials(s, global_norm=True)
    v0 = s.variables[0]
    et, wt = v0.mlir_element_type, WIDE[v0.mlir_element_type]
    total = partials[0]
    for k, p in enumerate(partials[1:], 1):  # a chain; sgd-fuse-step rebuilds it as a balanced tree
        s.b.emit(f"%total{k} = stablehlo.add {total}, {p} : tensor<{wt}>")
        total = f"%total{k}"
    fn = s.b.stage(f"global_norm_scale_{et}", "global_norm_scale", et=et, wt=wt, two=hex_literal(2.0, v0.dtype),
                   one=hex_literal(1.0, v0.dtype), c=hex_literal(s.config.clip_value, v0.dtype))
    s.b.call(["%scale"], fn, [total], [f"tensor<{wt}>"], [f"tensor<{et}>"])
    for i, v in enumerate(s.variables):
        t = v.mlir_type
        fn = s.b.stage(f"global_clip_apply_{class_suffix(v)}", "global_clip_apply", t=t, et=v.mlir_element_type)
        s.b.call([f"%g{i}_clipped"], fn, [s.grads[i], "%scale"], [t, f"tensor<{v.mlir_element_type}>"], [t])
        s.grads[i] = f"%g{i}_clipped"


def _clip_by_value(s: Step) -> None:
    """§4.5 clipvalue: each element clamped to [-c, c]."""
    c = s.config.clip_value
    for i, v in enumerate(s.variables):
        t = v.mlir_type
        fn = s.b.stage(f"clip_value_{class_suffix(v)}", "clip_value", t=t, c=hex_literal(c, v.dtype),
                       neg_c=hex_literal(-c, v.dtype))
        s.b.call([f"%g{i}_clipped"], fn, [s.grads[i]], [t], [t])
        s.grads[i] = f"%g{i}_clipped"


#: clip_mode -> its emitter (None: gradients pass unclipped).
CLIPPING: dict[str | None, Callable[[Step], None] | None] = {
    None: None, "clipnorm": _clip_by_norm, "global_clipnorm": _clip_by_global_norm, "clipvalue": _clip_by_value,
}


def emit_clipping(s: Step) -> None:
    """§4.5: clip every gradient by the config's clip mode (norm partials first: one norm tree)."""
    emitter = CLIPPING[s.config.clip_mode]
    if emitter is not None:
        emitter(s)


def emit_nonfinite_count(s: Step) -> None:
    """numerics.md §2a (skip_nonfinite): the number of non-finite elements of the gradients as given (before
    clipping), one f32 partial per variable summed in a chain (sgd-fuse-step folds them into the
    norms value, so one all_reduce carries both). Counting in f32 rounds above 2^24 elements,
    but a sum of non-negative terms is 0 only when every term is: the decision is exact."""
    if not getattr(s.config, "skip_nonfinite", False):
        return
    total = None
    for i, v in enumerate(s.variables):
        fn = s.b.stage(f"nonfinite_count_{class_suffix(v)}", "nonfinite_count", t=v.mlir_type,
                       t_pred=tensor_type(v.shape, "i1"), t_count=tensor_type(v.shape, "f32"),
                       dims=", ".join(map(str, range(len(v.shape)))))
        s.b.call([f"%nonfinite{i}"], fn, [s.grads[i]], [v.mlir_type], ["tensor<f32>"])
        if total is None:
            total = f"%nonfinite{i}"
        else:
            s.b.emit(f"%nonfinite_total{i} = stablehlo.add {total}, %nonfinite{i} : tensor<f32>")
            total = f"%nonfinite_total{i}"
    s.nonfinite = total


def _saturating_increment(s: Step, name: str, counter: str, when: str | None = None) -> str:
    """`counter + 1` (int64) unless it is already INT64_MAX, where it stays (no wrap to negative);
    with `when` (an i1), only on steps where it holds. Returns the new value's name. Reads
    `%int64_max`, which `emit_counter` defines."""
    s.b.emit(f"%{name}_below_max = stablehlo.compare NE, {counter}, %int64_max, SIGNED : "
             "(tensor<i64>, tensor<i64>) -> tensor<i1>")
    step = f"%{name}_below_max"
    if when is not None:
        s.b.emit(f"%{name}_counts = stablehlo.and {step}, {when} : tensor<i1>")
        step = f"%{name}_counts"
    s.b.emit(f"%{name}_increment = stablehlo.convert {step} : (tensor<i1>) -> tensor<i64>")
    s.b.emit(f"%{name}_next = stablehlo.add {counter}, %{name}_increment : tensor<i64>")
    return f"%{name}_next"


def emit_counter(s: Step) -> None:
    """§4.11: the iteration counter, incremented once per step, saturating at INT64_MAX; with
    skip_nonfinite a skipped step leaves it (optax apply_if_finite's convention, numerics.md)."""
    when = None
    s.b.emit(f"%int64_max = stablehlo.constant dense<{INT64_MAX}> : tensor<i64>")
    if getattr(s.config, "skip_nonfinite", False):
        s.b.emit("%count_zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>")
        s.b.emit(f"%skip = stablehlo.compare GT, {s.nonfinite}, %count_zero, FLOAT : "
                 "(tensor<f32>, tensor<f32>) -> tensor<i1>")
        s.b.emit("%applied = stablehlo.not %skip : tensor<i1>")
        s.skip, when = "%skip", "%applied"
    s.results[("iterations", None)] = _saturating_increment(s, "iterations", s.iterations, when)


def emit_skip(s: Step) -> None:
    """numerics.md §2a (skip_nonfinite): on a skipped step every variable, slot and average keeps its value
    (a select the elementwise chain fuses), and the skipped-step counter counts it (saturating)."""
    if s.skip is None:
        return
    for (role, var), value in list(s.results.items()):
        if role == "iterations":
            continue
        t = s.variables[var].mlir_type
        s.b.emit(f"%{role}{var}_kept = stablehlo.select {s.skip}, {s.arg[(role, var)]}, {value} : "
                 f"tensor<i1>, {t}")
        s.results[(role, var)] = f"%{role}{var}_kept"
    s.results[("skipped", None)] = _saturating_increment(s, "skipped", s.arg[("skipped", None)], s.skip)


# ---- per-variable rules: (step, index, variable, current weight value) -> new weight value -----

def emit_weight_decay(s: Step, i: int, v: VarSpec, w: str) -> str:
    """§4.7: decoupled weight decay with this step's lr (variables that opted out skip it)."""
    if s.config.weight_decay is None or not v.decay:
        return w
    t, et = v.mlir_type, v.mlir_element_type
    fn = s.b.stage(f"weight_decay_{class_suffix(v)}", "weight_decay", t=t, et=et,
                   wd=hex_literal(s.config.weight_decay, v.dtype, via_float32=True))
    s.b.call([f"%w{i}_decayed"], fn, [w, s.lr_in[et]], [t, f"tensor<{et}>"], [t])
    return f"%w{i}_decayed"


def update_variant(config: Any) -> str:
    """`plain`, `momentum` or `nesterov`: which update_step the config runs."""
    return "nesterov" if config.nesterov else ("momentum" if float(config.momentum) != 0.0 else "plain")


def emit_update(s: Step, i: int, v: VarSpec, w: str) -> str:
    """§4.8: update_step; writes the new momentum slot."""
    t, et = v.mlir_type, v.mlir_element_type
    variant = update_variant(s.config)
    fn = s.b.stage(f"update_{variant}_{class_suffix(v)}",
                   "update_nesterov" if variant == "nesterov" else "update_momentum", t=t, et=et, variant=variant,
                   mom=hex_literal(s.config.momentum, v.dtype, via_float32=True))
    s.b.call([f"%w{i}_updated:2"], fn, [w, s.arg[("momentum", i)], s.grads[i], s.lr_in[et]],
             [t, t, t, f"tensor<{et}>"], [t, t])
    s.results[("momentum", i)] = f"%w{i}_updated#1"
    return f"%w{i}_updated#0"


def emit_ema(s: Step, i: int, v: VarSpec, w: str) -> str:
    """§4.9: the moving average of the updated variable."""
    if not s.config.use_ema:
        return w
    t = v.mlir_type
    fn = s.b.stage(f"ema_{class_suffix(v)}", "ema", t=t, keep=hex_literal(s.config.ema_momentum, v.dtype),
                   take=hex_literal(1.0 - float(s.config.ema_momentum), v.dtype))
    s.b.call([f"%avg{i}_new"], fn, [s.arg[("average", i)], w], [t, t], [t])
    s.results[("average", i)] = f"%avg{i}_new"
    return w


def emit_ema_overwrite(s: Step, i: int, v: VarSpec, w: str) -> str:
    """§4.10: on due steps, the variable takes its average."""
    if s.due is None:
        return w
    t = v.mlir_type
    fn = s.b.stage(f"ema_overwrite_{class_suffix(v)}", "ema_overwrite", t=t)
    s.b.call([f"%w{i}_final"], fn, [w, s.results[("average", i)], s.due], [t, t, "tensor<i1>"], [t])
    return f"%w{i}_final"


#: The per-variable rules in SEMANTICS §4 order.
PER_VARIABLE: tuple[Callable[[Step, int, VarSpec, str], str], ...] = (
    emit_weight_decay, emit_update, emit_ema, emit_ema_overwrite)


def emit_variables(s: Step) -> None:
    """Runs the per-variable rules for each variable; its last value is the new variable."""
    for i, v in enumerate(s.variables):
        w = s.arg[("variable", i)]
        for rule in PER_VARIABLE:
            w = rule(s, i, v, w)
        s.results[("variable", i)] = w


#: Every rule of the step, in SEMANTICS §4 order.
RULES: tuple[Callable[[Step], None], ...] = (
    emit_gradient_segments, emit_learning_rate, emit_overwrite_due, emit_nonfinite_count, emit_clipping,
    emit_variables, emit_counter, emit_skip)
