"""The generator: SGDConfig + Mesh + [VarSpec] -> the stage-0 StableHLO module.

Stage 0 is the "global view": one private function per stage per variable class
(variables of the same shape, dtype and layout share them), rendered from
templates/*.mlir.j2, and a public @main that calls them in SEMANTICS.md §4's order
with `#sdy.sharding` on every argument and result. Its calling convention is
`sgdgen.codegen.abi.StepABI`. The text is parsed and verified with jaxlib's MLIR bindings;
nothing here traces Python with JAX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jinja2
import numpy as np

from sgdgen import __version__
from sgdgen.codegen import constants
from sgdgen.codegen.abi import StepABI
from sgdgen.frontend.spec import Mesh, VarSpec, numpy_dtype, tensor_type

#: The wide type that accumulates the norm of a variable of each element type (SEMANTICS §6).
WIDE = {"f16": "f32", "bf16": "f32", "f32": "f64", "f64": "f64"}

def hex_literal(value: float, dtype: str, *, via_float32: bool = False) -> str:
    """The exact bit pattern of `value` in `dtype`, as an MLIR hex literal (`0x3F800000`).

    `via_float32` rounds to float32 first, as `tf.cast(python_float, T)` does for the
    learning rate, momentum and weight decay; without it the double converts straight to T.
    The rounding is `sgdgen.codegen.constants`' own, independent of the reference's casts.
    """
    return constants.hex_bits((constants.cast_bits if via_float32 else constants.to_bits)(value, dtype), dtype)


@cache
def _environment() -> jinja2.Environment:
    root = resources.files("sgdgen.templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **params: Any) -> str:
    """Renders templates/<template>.mlir.j2 with `params` (missing params are errors)."""
    return _environment().get_template(f"{template}.mlir.j2").render(**params).strip() + "\n"


def template_names() -> list[str]:
    """Every stage template shipped with the package."""
    root = resources.files("sgdgen.templates")
    return sorted(p.name.removesuffix(".mlir.j2") for p in root.iterdir() if p.name.endswith(".mlir.j2"))


class GenerateError(ValueError):
    """A config and variable list that cannot be turned into a step, with the fix."""


# ---- learning-rate schedules ------------------------------------------------------------

_SCHEDULE_TEMPLATES = {
    "ExponentialDecay": "lr_exponential_decay",
    "InverseTimeDecay": "lr_inverse_time_decay",
    "PiecewiseConstantDecay": "lr_piecewise_constant_decay",
    "PolynomialDecay": "lr_polynomial_decay",
    "CosineDecay": "lr_cosine_decay",
    "CosineDecayRestarts": "lr_cosine_decay_restarts",
}


def _f32(x: float) -> str:
    return hex_literal(float(x), "float32")


def render_schedule(schedule: Any, fn: str = "learning_rate") -> str:
    """The @learning_rate(iterations) -> f32 function of a Keras schedule."""
    kind = type(schedule).__name__
    if kind not in _SCHEDULE_TEMPLATES:
        raise GenerateError(
            f"learning_rate: schedule {kind} cannot be compiled into the step; use one of "
            f"{sorted(_SCHEDULE_TEMPLATES)}, a float, or a callable (evaluated once, at construction)"
        )
    s = schedule
    p: dict[str, Any] = {"fn": fn}
    if kind in ("ExponentialDecay", "InverseTimeDecay"):
        p.update(initial_learning_rate=_f32(s.initial_learning_rate), decay_steps=_f32(s.decay_steps),
                 decay_rate=_f32(s.decay_rate), staircase=bool(s.staircase))
    elif kind == "PiecewiseConstantDecay":
        p.update(boundaries=[int(b) for b in s.boundaries], values=[_f32(v) for v in s.values])
    elif kind == "PolynomialDecay":
        p.update(initial_learning_rate=_f32(s.initial_learning_rate), end_learning_rate=_f32(s.end_learning_rate),
                 power=_f32(s.power), decay_steps=_f32(s.decay_steps), cycle=bool(s.cycle))
    elif kind == "CosineDecay":
        warmup = s.warmup_target is not None
        p.update(initial_learning_rate=_f32(s.initial_learning_rate), decay_steps=_f32(s.decay_steps),
                 pi=_f32(math.pi), alpha=_f32(s.alpha),
                 warmup=warmup, warmup_target=_f32(s.warmup_target) if warmup else None,
                 warmup_steps=_f32(s.warmup_steps))
    else:  # CosineDecayRestarts
        p.update(initial_learning_rate=_f32(s.initial_learning_rate), first_decay_steps=_f32(s.first_decay_steps),
                 t_mul=_f32(s.t_mul), m_mul=_f32(s.m_mul), alpha=_f32(s.alpha), pi=_f32(math.pi),
                 geometric=np.float32(s.t_mul) != np.float32(1.0))
    return render(_SCHEDULE_TEMPLATES[kind], **p)


# ---- the module -------------------------------------------------------------------------

@dataclass
class _Builder:
    """Collects stage functions (each rendered once) and the lines of @main."""

    functions: dict[str, str] = field(default_factory=dict)
    body: list[str] = field(default_factory=list)

    def stage(self, fn: str, template: str, **params: Any) -> str:
        if fn not in self.functions:
            self.functions[fn] = render(template, fn=fn, **params)
        return fn

    def emit(self, line: str) -> None:
        self.body.append("    " + line)

    def call(self, results: Sequence[str], fn: str, args: Sequence[str], arg_types: Sequence[str],
             result_types: Sequence[str]) -> None:
        lhs = ", ".join(results)
        rt = result_types[0] if len(result_types) == 1 else "(" + ", ".join(result_types) + ")"
        self.emit(f"{lhs} = func.call @{fn}({', '.join(args)}) : ({', '.join(arg_types)}) -> {rt}")


def _class_suffix(v: VarSpec) -> str:
    """Name of a variable class: `8x16xf32`, plus the layout when sharded: per dimension its
    axes joined by '.', or '0' when unsharded (no axis name starts with a digit), dimensions
    joined by '$' (no axis name holds one), so different layouts never share a name:
    `8x16xf32_0$model`, `16x16xf32_batch.model$0`."""
    s = "x".join([*map(str, v.shape), v.mlir_element_type])
    if v.layout.used_axes:
        s += "_" + "$".join(".".join(d) if d else "0" for d in v.layout.dims)
    return s


def _check(config: Any, variables: Sequence[VarSpec], mesh: Mesh) -> None:
    if not variables:
        raise GenerateError("no variables: give at least one variable to build a step for")
    names = [v.name for v in variables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GenerateError(f"variable {dup[0]!r} is listed twice; every variable needs a unique name")
    for v in variables:
        if v.layout.mesh != mesh:
            raise GenerateError(f"variable {v.name!r} is laid out on mesh {v.layout.mesh}, not on the step's mesh "
                                f"{mesh}; build its Layout on the same mesh")
    if config.clip_mode == "global_clipnorm":
        dtypes = sorted({v.dtype for v in variables})
        if len(dtypes) > 1:
            raise GenerateError(
                f"global_clipnorm needs every gradient in one dtype (tf.clip_by_global_norm stacks the norms), "
                f"but the variables have {dtypes}; use clipnorm, or keep all variables in one dtype"
            )


def module_attributes(mesh: Mesh) -> str:
    return (f"mhlo.num_partitions = {mesh.size} : i32, mhlo.num_replicas = 1 : i32, "
            f'sgdgen.version = "{__version__}"')


def generate_text(config: Any, variables: Sequence[VarSpec], mesh: Mesh | None = None) -> str:
    """The stage-0 module as text. See `generate` for the parsed, verified module."""
    mesh = mesh if mesh is not None else (variables[0].layout.mesh if variables else Mesh(()))
    _check(config, variables, mesh)
    lr_input = not config.lr_is_schedule
    abi = StepABI.create(variables, mesh, use_ema=config.use_ema, lr_input=lr_input, optimizer_name=config.name)
    b = _Builder()
    arg = {(s.role, s.var): f"%arg{k}" for k, s in enumerate(abi.inputs)}
    it = arg[("iterations", None)]

    # Step 0: this step's learning rate, at iterations before the increment (SEMANTICS §4.0).
    if lr_input:
        lr = arg[("learning_rate", None)]
    else:
        b.functions["learning_rate"] = render_schedule(config.learning_rate)
        b.call(["%lr"], "learning_rate", [it], ["tensor<i64>"], ["tensor<f32>"])
        lr = "%lr"
    lr_in = {}
    for et in dict.fromkeys(v.mlir_element_type for v in variables):
        if et == "f32":
            lr_in[et] = lr
        else:
            lr_in[et] = f"%lr_{et}"
            b.emit(f"%lr_{et} = stablehlo.convert {lr} : (tensor<f32>) -> tensor<{et}>")

    overwrite = config.ema_overwrite_every if config.use_ema else None
    if overwrite:
        b.stage("overwrite_due", "overwrite_due", frequency=int(overwrite))
        b.call(["%due"], "overwrite_due", [it], ["tensor<i64>"], ["tensor<i1>"])

    # Step 5: clipping. Norm partials first, so that all norms of the step form one tree.
    mode, c = config.clip_mode, config.clip_value
    grads = {i: arg[("gradient", i)] for i in range(len(variables))}
    if mode in ("clipnorm", "global_clipnorm"):
        partials = []
        for i, v in enumerate(variables):
            et, t = v.mlir_element_type, v.mlir_type
            wt = WIDE[et]
            half = None
            if mode == "global_clipnorm":
                half = "elementwise" if v.dtype == "float16" else "wide"
            fn = b.stage(f"{'l2_loss' if half else 'norm_sq'}_{_class_suffix(v)}", "norm_partial", t=t, wt=wt,
                         t_wide=tensor_type(v.shape, wt), half=half, half_value=hex_literal(0.5, v.dtype),
                         dims=", ".join(map(str, range(len(v.shape)))))
            b.call([f"%partial{i}"], fn, [grads[i]], [t], [f"tensor<{wt}>"])
            partials.append(f"%partial{i}")
        if mode == "global_clipnorm":
            v0 = variables[0]
            et, wt = v0.mlir_element_type, WIDE[v0.mlir_element_type]
            total = partials[0]
            for k, p in enumerate(partials[1:], 1):
                b.emit(f"%total{k} = stablehlo.add {total}, {p} : tensor<{wt}>")
                total = f"%total{k}"
            fn = b.stage(f"global_norm_scale_{et}", "global_norm_scale", et=et, wt=wt,
                         two=hex_literal(2.0, v0.dtype), one=hex_literal(1.0, v0.dtype), c=hex_literal(c, v0.dtype))
            b.call(["%scale"], fn, [total], [f"tensor<{wt}>"], [f"tensor<{et}>"])
            for i, v in enumerate(variables):
                t = v.mlir_type
                fn = b.stage(f"global_clip_apply_{_class_suffix(v)}", "global_clip_apply", t=t,
                             et=v.mlir_element_type)
                b.call([f"%g{i}_clipped"], fn, [grads[i], "%scale"], [t, f"tensor<{v.mlir_element_type}>"], [t])
                grads[i] = f"%g{i}_clipped"
        else:
            for i, v in enumerate(variables):
                t, et = v.mlir_type, v.mlir_element_type
                fn = b.stage(f"clip_norm_{_class_suffix(v)}", "clip_norm", t=t, et=et, wt=WIDE[et],
                             c=hex_literal(c, v.dtype))
                b.call([f"%g{i}_clipped"], fn, [grads[i], partials[i]], [t, f"tensor<{WIDE[et]}>"], [t])
                grads[i] = f"%g{i}_clipped"
    elif mode == "clipvalue":
        for i, v in enumerate(variables):
            t = v.mlir_type
            fn = b.stage(f"clip_value_{_class_suffix(v)}", "clip_value", t=t, c=hex_literal(c, v.dtype),
                         neg_c=hex_literal(-c, v.dtype))
            b.call([f"%g{i}_clipped"], fn, [grads[i]], [t], [t])
            grads[i] = f"%g{i}_clipped"

    variant = "nesterov" if config.nesterov else ("momentum" if float(config.momentum) != 0.0 else "plain")
    results: dict[tuple[str, int | None], str] = {}
    for i, v in enumerate(variables):
        t, et, cls = v.mlir_type, v.mlir_element_type, _class_suffix(v)
        w, m = arg[("variable", i)], arg[("momentum", i)]
        # Step 7: decoupled weight decay with this step's lr.
        if config.weight_decay is not None and v.decay:
            fn = b.stage(f"weight_decay_{cls}", "weight_decay", t=t, et=et,
                         wd=hex_literal(config.weight_decay, v.dtype, via_float32=True))
            b.call([f"%w{i}_decayed"], fn, [w, lr_in[et]], [t, f"tensor<{et}>"], [t])
            w = f"%w{i}_decayed"
        # Step 8: update_step.
        fn = b.stage(f"update_{variant}_{cls}", "update_nesterov" if variant == "nesterov" else "update_momentum",
                     t=t, et=et, variant=variant,
                     mom=hex_literal(config.momentum, v.dtype, via_float32=True))
        b.call([f"%w{i}_updated:2"], fn, [w, m, grads[i], lr_in[et]], [t, t, t, f"tensor<{et}>"], [t, t])
        w, m = f"%w{i}_updated#0", f"%w{i}_updated#1"
        results[("momentum", i)] = m
        # Steps 9-10: EMA and its periodic overwrite.
        if config.use_ema:
            fn = b.stage(f"ema_{cls}", "ema", t=t, keep=hex_literal(config.ema_momentum, v.dtype),
                         take=hex_literal(1.0 - float(config.ema_momentum), v.dtype))
            b.call([f"%avg{i}_new"], fn, [arg[("average", i)], w], [t, t], [t])
            results[("average", i)] = f"%avg{i}_new"
            if overwrite:
                fn = b.stage(f"ema_overwrite_{cls}", "ema_overwrite", t=t)
                b.call([f"%w{i}_final"], fn, [w, f"%avg{i}_new", "%due"], [t, t, "tensor<i1>"], [t])
                w = f"%w{i}_final"
        results[("variable", i)] = w
    # Step 11: the iteration counter.
    b.emit("%one = stablehlo.constant dense<1> : tensor<i64>")
    b.emit(f"%iterations_next = stablehlo.add {it}, %one : tensor<i64>")
    results[("iterations", None)] = "%iterations_next"

    def attrs(slot: Any) -> str:
        return f"{{sdy.sharding = {slot.layout.sdy_text()}}}"

    args = ",\n      ".join(f"%arg{k}: {s.mlir_type} {attrs(s)}" for k, s in enumerate(abi.inputs))
    outs = ",\n      ".join(f"{s.mlir_type} {attrs(s)}" for s in abi.outputs)
    ret_vals = ", ".join(results[(s.role, s.var)] for s in abi.outputs)
    ret_types = ", ".join(s.mlir_type for s in abi.outputs)
    b.emit(f"return {ret_vals} : {ret_types}")
    return render("module", mesh=mesh.sdy_mesh_text(), attributes=module_attributes(mesh),
                  functions=list(b.functions.values()), args=args, results=outs, body="\n".join(b.body),
                  state_count=len(abi.outputs))


def generate(config: Any, variables: Sequence[VarSpec], mesh: Mesh | None = None, ctx: Any = None) -> Any:
    """The stage-0 module, parsed and verified (a `jaxlib.mlir.ir.Module`)."""
    from sgdgen.codegen.ir import parse_module

    return parse_module(generate_text(config, variables, mesh), ctx)


__all__ = ["GenerateError", "WIDE", "generate", "generate_text", "hex_literal", "render", "render_schedule",
           "template_names"]
