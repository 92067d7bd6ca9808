"""Drive a compiled SGD step against the NumPy reference (sgdgen.reference).

Used by the numerics tests, and meant to be reused for partitioned programs: give
`run_against_reference` a `transform(text) -> text` (e.g. the pass pipeline) and a mesh.

The driver generates the stage-0 module for (config, variables, mesh), optionally rewrites
it, compiles it once with `StepExecutable`, and runs `steps` steps from random initial
variables with random gradients, both on the devices and in the reference. After every
step it compares each state slot (variables, momenta, EMA averages) with the reference and
keeps, per slot, the worst error over the steps, as a fraction of max|ref| and in ulps of
max|ref| (the "scale": max|ref| of the slot so far, see SlotError). `assert_matches`
checks those numbers against SEMANTICS decisions 10 and 12.

The compiled step always takes every gradient: None gradients (SEMANTICS §4.4) are not
supported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from sgdgen import reference
from sgdgen.codegen.abi import StepABI
from sgdgen.codegen.generate import generate_text
from sgdgen.runtime.executable import StepExecutable
from sgdgen.frontend.spec import Mesh, VarSpec, numpy_dtype

__all__ = [
    "CompiledStep",
    "Result",
    "SlotError",
    "assert_matches",
    "compile_step",
    "random_gradients",
    "run_against_reference",
    "ulp",
]

#: Per step, the size of the gradients relative to the active clip threshold: small steps
#: (x0.4) stay below it and large steps (x2.5) go over it, with a per-variable jitter.
_SMALL, _LARGE = 0.4, 2.5


# ---- compiling and running --------------------------------------------------------------


@dataclass
class CompiledStep:
    """One compiled step with its calling convention and the text it was compiled from."""

    exe: StepExecutable
    abi: StepABI
    text: str
    config: Any
    variables: list[VarSpec]
    mesh: Mesh

    def initial_state(self, variables: Sequence[np.ndarray], *, iterations: int = 0) -> list[Any]:
        """The state arguments (abi.outputs order) for `reference.build(config, variables)`."""
        st = reference.build(self.config, variables)
        host: dict[tuple[str, int | None], Any] = {("iterations", None): np.int64(iterations)}
        for i in range(len(self.variables)):
            host[("variable", i)] = st.variables[i]
            host[("momentum", i)] = st.momenta[i]
            if st.averages is not None:
                host[("average", i)] = st.averages[i]
        return [self.exe.put(s, host[(s.role, s.var)]) for s in self.abi.outputs]

    def step(self, state: list[Any], grads: Sequence[np.ndarray], lr: float | None = None) -> list[Any]:
        """Runs one step; `lr` is the learning_rate argument (only for a float learning rate)."""
        args = list(state)
        for i, g in enumerate(grads):
            args.append(self.exe.put(self.abi.inputs[self.abi.index("gradient", i)], g))
        if self.has_lr_input:
            if lr is None:
                lr = self.config.learning_rate
            args.append(self.exe.put(self.abi.inputs[self.abi.index("learning_rate")], np.float32(lr)))
        elif lr is not None:
            raise TypeError("this step computes its learning rate from a schedule; it takes no lr argument")
        return self.exe(args)

    @property
    def has_lr_input(self) -> bool:
        return any(s.role == "learning_rate" for s in self.abi.inputs)

    def host(self, state: Sequence[Any]) -> dict[tuple[str, int | None], np.ndarray]:
        """The state as NumPy arrays, keyed by (role, variable index)."""
        return {(s.role, s.var): np.asarray(a) for s, a in zip(self.abi.outputs, state)}


def compile_step(config: Any, variables: Sequence[VarSpec], mesh: Mesh, *,
                 transform: Callable[[str], str] | None = None, in_place: bool | None = None) -> CompiledStep:
    """Stage-0 text for (config, variables, mesh), rewritten by `transform` if given, compiled.

    `in_place`: require every state buffer to be aliased (`StepExecutable.compile`); by
    default only when a transform is given, since stage 0 has no aliasing yet.
    """
    variables = list(variables)
    text = generate_text(config, variables, mesh)
    if transform is not None:
        text = transform(text)
    if in_place is None:
        in_place = transform is not None
    abi = StepABI.create(variables, mesh, use_ema=config.use_ema, lr_input=not config.lr_is_schedule,
                         optimizer_name=config.name)
    exe = StepExecutable.compile(text, abi, mesh, in_place=in_place)
    return CompiledStep(exe, abi, text, config, variables, mesh)


# ---- random data ------------------------------------------------------------------------


def _clip_target(config: Any, n_vars: int) -> tuple[str | None, float]:
    """(what to normalise, to what) so that the active clip sits between small and large steps."""
    mode, c = config.clip_mode, config.clip_value
    if mode == "clipnorm":
        return "norm", float(c)
    if mode == "global_clipnorm":
        return "norm", float(c) / math.sqrt(n_vars)
    if mode == "clipvalue":
        return "max", float(c)
    return None, 1.0


def random_gradients(rng: np.random.Generator, config: Any, variables: Sequence[VarSpec],
                     step: int) -> list[np.ndarray]:
    """Normal gradients in each variable's dtype, sized against the active clip.

    Even steps are small (about 0.4x the clip threshold) and odd steps large (about 2.5x),
    with a per-variable jitter exp(N(0, 0.4)), so that clipping triggers on some steps and
    not on others. Norm clips scale each tensor to a norm near c (c/sqrt(n) per tensor for
    the global norm); clipvalue scales max|g| near c. Without a clip the entries are N(0, 1).
    """
    what, target = _clip_target(config, len(variables))
    factor = _SMALL if step % 2 == 0 else _LARGE
    out = []
    for v in variables:
        z = rng.standard_normal(v.shape)
        jitter = math.exp(0.4 * rng.standard_normal())
        if what == "norm":
            z = z / max(np.linalg.norm(z), 1e-30) * target * factor * jitter
        elif what == "max":
            z = z / max(np.max(np.abs(z)), 1e-30) * target * factor * jitter
        out.append(np.asarray(z).astype(numpy_dtype(v.dtype)))
    return out


def _clip_triggered(config: Any, grads: Sequence[np.ndarray]) -> list[bool]:
    """Per variable: whether the active clip changes this gradient (by the reference's norms)."""
    mode, c = config.clip_mode, config.clip_value
    if mode is None:
        return [False] * len(grads)
    g64 = [np.asarray(g, dtype=np.float64) for g in grads]
    if mode == "clipnorm":
        return [bool(np.sqrt(np.sum(g * g)) > c) for g in g64]
    if mode == "global_clipnorm":
        total = math.sqrt(sum(float(np.sum(g * g)) for g in g64))
        return [total > c] * len(grads)
    return [bool(np.max(np.abs(g), initial=0.0) > c) for g in g64]


# ---- comparison -------------------------------------------------------------------------


def ulp(x: float, dtype: Any) -> float:
    """The spacing of `dtype` at magnitude |x| (the ulp of the "scale"); min subnormal at 0."""
    fi = ml_dtypes.finfo(np.dtype(dtype))
    x = abs(float(x))
    tiny = float(fi.smallest_normal)
    if not math.isfinite(x):
        return math.inf
    if x < tiny:
        return float(fi.smallest_subnormal)
    return 2.0 ** (math.floor(math.log2(x)) - int(fi.nmant))


def _max_abs_finite(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))


@dataclass
class SlotError:
    """The worst error of one state slot over the steps (the step at which it was worst).

    The "scale" of a slot after step k is max|ref| of that slot over its initial value and
    steps 1..k. A running maximum, not the value at step k alone: the state is one
    trajectory, and an update that cancels (a variable passing near 0, a momentum that turns)
    leaves the error of the larger terms it came from (1 ulp of a 0.1-sized term is
    7.5e-9, which is 3e-6 of a variable that has just become 0.0027). `rel_here` keeps the
    error relative to max|ref| at the step itself, for information.
    """

    role: str  # "variable", "momentum" or "average"
    var: int
    name: str  # the variable's name
    dtype: str
    step: int = 0  # 1-based step of the worst error (in ulps for 16-bit dtypes, else relative)
    err: float = 0.0  # max |compiled - ref| at that step
    scale: float = 0.0  # the scale (running max|ref|) at that step
    rel: float = 0.0  # worst err / scale over the steps
    ulps: float = 0.0  # worst err / ulp(scale) over the steps
    rel_here: float = 0.0  # worst err / max|ref at the same step| over the steps
    running_scale: float = 0.0

    def start(self, initial: np.ndarray) -> None:
        """The slot's value before step 1 (counts towards the scale)."""
        self.running_scale = max(self.running_scale, _max_abs_finite(initial))

    def update(self, step: int, got: np.ndarray, want: np.ndarray) -> None:
        g = np.asarray(got, dtype=np.float64)
        w = np.asarray(want, dtype=np.float64)
        here = _max_abs_finite(w)
        self.running_scale = scale = max(self.running_scale, here)
        if g.shape != w.shape:
            err = math.inf
        else:
            same_nan = np.isnan(g) & np.isnan(w)
            same_inf = np.isinf(w) & (g == w)
            diff = np.where(same_nan | same_inf, 0.0, np.abs(g - w))
            diff = np.where(np.isnan(diff), np.inf, diff)
            err = float(np.max(diff, initial=0.0))
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        ulps = err / ulp(scale, numpy_dtype(self.dtype)) if err else 0.0
        # The step reported is the worst by the measure the dtype is judged by (decisions 10, 12).
        key, best = (ulps, self.ulps) if self.is_16bit else (rel, self.rel)
        if key > best or self.step == 0:
            self.step, self.err, self.scale = step, err, scale
        self.rel = max(self.rel, rel)
        self.ulps = max(self.ulps, ulps)
        self.rel_here = max(self.rel_here, err / here if here > 0 else (0.0 if err == 0 else math.inf))

    @property
    def is_16bit(self) -> bool:
        return np.dtype(numpy_dtype(self.dtype)).itemsize <= 2

    @property
    def label(self) -> str:
        return f"{self.role} of {self.name!r}"


@dataclass
class Result:
    """What `run_against_reference` saw."""

    config: Any
    variables: list[VarSpec]
    mesh: Mesh
    steps: int
    slots: list[SlotError]
    iterations: list[tuple[int, int]]  # per step: (compiled, reference)
    learning_rates: list[float]  # the float32 lr of each step, as the reference used it
    clipped: list[list[bool]]  # per step, per variable: did the active clip change the gradient
    compiled: CompiledStep
    final_compiled: dict[tuple[str, int | None], np.ndarray] = field(repr=False, default_factory=dict)
    final_reference: Any = field(repr=False, default=None)

    @property
    def iterations_ok(self) -> bool:
        return all(a == b for a, b in self.iterations)

    def worst(self, role: str | None = None) -> SlotError:
        cands = [s for s in self.slots if role is None or s.role == role]
        return max(cands, key=lambda s: s.rel)

    @property
    def max_rel(self) -> float:
        return max((s.rel for s in self.slots), default=0.0)

    @property
    def max_ulps(self) -> float:
        return max((s.ulps for s in self.slots), default=0.0)

    def summary(self) -> str:
        lines = [f"{self.steps} steps, iterations {'match' if self.iterations_ok else 'DIFFER'}"]
        for s in self.slots:
            lines.append(f"  {s.label:40s} {s.dtype:8s} rel {s.rel:.3g} ({s.ulps:.3g} ulp) at step {s.step}"
                         f"; vs max|ref| of that step {s.rel_here:.3g}")
        return "\n".join(lines)


def _lr_for_step(lr_values: Any, k: int) -> float:
    if callable(lr_values):
        return float(lr_values(k))
    return float(lr_values[k])


def run_against_reference(
    config: Any,
    variables: list[VarSpec],
    mesh: Mesh,
    *,
    steps: int = 10,
    seed: int = 0,
    transform: Callable[[str], str] | None = None,
    in_place: bool | None = None,
    lr_schedule_of_values: Sequence[float] | Callable[[int], float] | None = None,
    none_grads: dict[int, set[int]] | None = None,
) -> Result:
    """Runs `steps` steps of the compiled step and of the reference; compares every slot after each.

    `lr_schedule_of_values`: for a float learning rate, the value of the learning_rate
    argument at step k (0-based; a sequence or a callable), passed to the reference as
    `lr_override`. Without it the config's learning rate is used every step.
    `in_place`: see `compile_step` (default: required iff `transform` is given).
    `none_grads` (step -> variable indices with a None gradient) is not supported: the
    compiled step takes every gradient.
    """
    if none_grads:
        raise NotImplementedError("the compiled step takes every gradient; None gradients are not supported")
    if lr_schedule_of_values is not None and config.lr_is_schedule:
        raise TypeError("a schedule's learning rate is computed in the step; it cannot be changed between steps")
    variables = list(variables)
    cs = compile_step(config, variables, mesh, transform=transform, in_place=in_place)
    rng = np.random.default_rng(seed)
    init = [np.asarray(rng.standard_normal(v.shape)).astype(numpy_dtype(v.dtype)) for v in variables]
    ref = reference.build(config, init)
    state = cs.initial_state(init)
    decay_mask = [v.decay for v in variables]
    slots = [SlotError(role, i, v.name, v.dtype)
             for role in ("variable", "momentum", "average") if role != "average" or config.use_ema
             for i, v in enumerate(variables)]
    initial = {"variable": ref.variables, "momentum": ref.momenta, "average": ref.averages}
    for s in slots:
        s.start(initial[s.role][s.var])
    iterations, lrs, clipped = [], [], []
    host: dict[tuple[str, int | None], np.ndarray] = {}
    for k in range(steps):
        grads = random_gradients(rng, config, variables, k)
        clipped.append(_clip_triggered(config, grads))
        lr = None if lr_schedule_of_values is None else _lr_for_step(lr_schedule_of_values, k)
        lrs.append(float(reference.learning_rate(config, ref.iterations) if lr is None else np.float32(lr)))
        state = cs.step(state, grads, lr)
        ref = reference.apply_gradients(config, ref, grads, decay_mask=decay_mask, lr_override=lr)
        host = cs.host(state)
        iterations.append((int(host[("iterations", None)]), int(ref.iterations)))
        want = {"variable": ref.variables, "momentum": ref.momenta, "average": ref.averages}
        for s in slots:
            s.update(k + 1, host[(s.role, s.var)], want[s.role][s.var])
    return Result(config, variables, mesh, steps, slots, iterations, lrs, clipped, cs, host, ref)


def assert_matches(result: Result, *, rtol: float = 1e-6, ulps: float = 2.0) -> None:
    """SEMANTICS decisions 10 and 12: float32/float64 within rtol * max|ref|; 16-bit within
    `ulps` ulp of max|ref|; iterations equal after every step."""
    failures = []
    for k, (got, want) in enumerate(result.iterations, 1):
        if got != want:
            failures.append(f"iterations after step {k}: compiled {got}, reference {want}")
            break
    for s in result.slots:
        where = f"{s.label} ({s.dtype}) after step {s.step} of {result.steps}"
        if s.is_16bit:
            if not s.ulps <= ulps:
                failures.append(f"{where}: error {s.err:.6g} = {s.ulps:.3g} ulp of the scale max|ref| {s.scale:.6g} "
                                f"(allowed {ulps} ulp)")
        elif not s.rel <= rtol:
            failures.append(f"{where}: error {s.err:.6g} = {s.rel:.3g} x the scale max|ref| {s.scale:.6g} "
                            f"(allowed rtol {rtol:g})")
    if failures:
        raise AssertionError(f"compiled step differs from the reference ({result.config!r} on mesh "
                             f"'{result.mesh}'):\n  " + "\n  ".join(failures))
