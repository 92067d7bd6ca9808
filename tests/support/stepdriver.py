"""Drive a compiled SGD step against the NumPy reference (sgdgen.reference).

Used by the numerics tests, and meant to be reused for partitioned programs: give
`run_against_reference` a `transform(text) -> text` (e.g. the pass pipeline) and a mesh.

The driver generates the stage-0 module for (config, variables, mesh), optionally rewrites
it, compiles it once with `StepExecutable`, and runs `steps` steps from random initial
variables with random gradients, both on the devices and in the reference. After every
step it compares each state slot (variables, momenta, EMA averages) twice
(docs/numerics.md §4):

- per step (`Result.slots`): with the reference fed the program's own state before the
  step, so each step's error is measured alone and does not compound: float32 within
  rtol 1e-6 of the scale, float16 / bfloat16 within 2 ulp of the scale;
- over the trajectory (`Result.trajectory`): with an independent reference run from the
  same initial state. float32 within rtol 1e-6; 16-bit within a bound derived from the
  per-step allowance and the step's linear dependence on the state (`TrajectoryBound`),
  since a 1-ulp difference in a momentum is carried, scaled by `momentum`, into every
  later step.

The "scale" of a slot is max|ref| of that slot so far (see SlotError).

The compiled step always takes every gradient: None gradients (docs/numerics.md §2) are not
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
    "EmulatedStep",
    "Result",
    "SlotError",
    "TrajectoryBound",
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


@dataclass
class EmulatedStep:
    """A stand-in for a compiled step, computed by the reference with its momentum update
    replaced (`update`, the signature of `reference.sgd_update`) and/or its initial state
    changed (`initial`): to test the comparisons themselves on a known difference, on any
    machine, without a compiler in the loop."""

    config: Any
    variables: list[VarSpec]
    update: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None
    initial: Callable[[reference.RefState], reference.RefState] | None = None

    def initial_state(self, variables: Sequence[np.ndarray]) -> reference.RefState:
        st = reference.build(self.config, variables)
        return self.initial(st) if self.initial is not None else st

    def step(self, state: reference.RefState, grads: Sequence[np.ndarray], lr: float | None = None) -> Any:
        real = reference.sgd_update
        reference.sgd_update = self.update or real
        try:
            return reference.apply_gradients(self.config, state, grads, decay_mask=[v.decay for v in self.variables],
                                             lr_override=lr)
        finally:
            reference.sgd_update = real

    @property
    def has_lr_input(self) -> bool:
        return not self.config.lr_is_schedule

    def host(self, state: reference.RefState) -> dict[tuple[str, int | None], np.ndarray]:
        out: dict[tuple[str, int | None], np.ndarray] = {("iterations", None): np.int64(state.iterations)}
        for i in range(len(self.variables)):
            out["variable", i], out["momentum", i] = state.variables[i], state.momenta[i]
            if state.averages is not None:
                out["average", i] = state.averages[i]
        return out


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
    both_scale: float = 0.0  # running max of |compiled| and |ref|: every value of either is below it
    last_err: float = 0.0  # max |compiled - ref| at the latest step
    bound: float = math.inf  # TrajectoryBound's allowance at the latest step (absolute)
    of_bound: float = 0.0  # worst last_err / bound over the steps

    def start(self, initial: np.ndarray) -> None:
        """The slot's value before step 1 (counts towards the scale)."""
        self.running_scale = max(self.running_scale, _max_abs_finite(initial))
        self.both_scale = max(self.both_scale, self.running_scale)

    def update(self, step: int, got: np.ndarray, want: np.ndarray) -> None:
        g = np.asarray(got, dtype=np.float64)
        w = np.asarray(want, dtype=np.float64)
        here = _max_abs_finite(w)
        self.running_scale = scale = max(self.running_scale, here)
        self.both_scale = max(self.both_scale, scale, _max_abs_finite(g))
        if g.shape != w.shape:
            err = math.inf
        else:
            same_nan = np.isnan(g) & np.isnan(w)
            same_inf = np.isinf(w) & (g == w)
            diff = np.where(same_nan | same_inf, 0.0, np.abs(g - w))
            diff = np.where(np.isnan(diff), np.inf, diff)
            err = float(np.max(diff, initial=0.0))
        self.last_err = err
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        ulps = err / ulp(scale, numpy_dtype(self.dtype)) if err else 0.0
        # The step reported is the worst by the measure the dtype is judged by (decisions 10, 12).
        key, best = (ulps, self.ulps) if self.is_16bit else (rel, self.rel)
        if key > best or self.step == 0:
            self.step, self.err, self.scale = step, err, scale
        self.rel = max(self.rel, rel)
        self.ulps = max(self.ulps, ulps)
        self.rel_here = max(self.rel_here, err / here if here > 0 else (0.0 if err == 0 else math.inf))

    def check_bound(self, bound: float) -> None:
        """Records `TrajectoryBound`'s allowance for the latest step."""
        self.bound = bound
        ratio = self.last_err / bound if bound > 0 else (0.0 if self.last_err == 0 else math.inf)
        self.of_bound = max(self.of_bound, ratio)

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
    compiled: CompiledStep | EmulatedStep
    final_compiled: dict[tuple[str, int | None], np.ndarray] = field(repr=False, default_factory=dict)
    final_reference: Any = field(repr=False, default=None)
    trajectory: list[SlotError] = field(default_factory=list)  # against the independent reference run

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
        for s, t in zip(self.slots, self.trajectory):
            lines.append(f"  {s.label:40s} {s.dtype:8s} per step: rel {s.rel:.3g} ({s.ulps:.3g} ulp) at step {s.step}"
                         f"; trajectory: rel {t.rel:.3g} ({t.ulps:.3g} ulp), {t.of_bound:.3g} of its bound")
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
    program: EmulatedStep | None = None,
) -> Result:
    """Runs `steps` steps of the compiled step and of the reference; compares every slot after each,
    per step (the reference fed the program's state) and over the trajectory (an independent reference).

    `lr_schedule_of_values`: for a float learning rate, the value of the learning_rate
    argument at step k (0-based; a sequence or a callable), passed to the reference as
    `lr_override`. Without it the config's learning rate is used every step.
    `in_place`: see `compile_step` (default: required iff `transform` is given).
    `none_grads` (step -> variable indices with a None gradient) is not supported: the
    compiled step takes every gradient. `program`: run this instead of compiling (an
    `EmulatedStep`, to test the comparisons).
    """
    if none_grads:
        raise NotImplementedError("the compiled step takes every gradient; None gradients are not supported")
    if lr_schedule_of_values is not None and config.lr_is_schedule:
        raise TypeError("a schedule's learning rate is computed in the step; it cannot be changed between steps")
    variables = list(variables)
    cs: Any = program if program is not None else compile_step(config, variables, mesh, transform=transform,
                                                                in_place=in_place)
    rng = np.random.default_rng(seed)
    init = [np.asarray(rng.standard_normal(v.shape)).astype(numpy_dtype(v.dtype)) for v in variables]
    ref = reference.build(config, init)
    state = cs.initial_state(init)
    decay_mask = [v.decay for v in variables]
    slots = [SlotError(role, i, v.name, v.dtype)
             for role in ("variable", "momentum", "average") if role != "average" or config.use_ema
             for i, v in enumerate(variables)]
    initial = {"variable": ref.variables, "momentum": ref.momenta, "average": ref.averages}
    trajectory = [SlotError(s.role, s.var, s.name, s.dtype) for s in slots]
    for s in slots + trajectory:
        s.start(initial[s.role][s.var])
    bounds = TrajectoryBound(config, variables)
    iterations, lrs, clipped = [], [], []
    host = cs.host(state)
    for k in range(steps):
        grads = random_gradients(rng, config, variables, k)
        clipped.append(_clip_triggered(config, grads))
        lr = None if lr_schedule_of_values is None else _lr_for_step(lr_schedule_of_values, k)
        lrs.append(float(reference.learning_rate(config, ref.iterations) if lr is None else np.float32(lr)))
        before = _ref_state(host, len(variables), config.use_ema)
        state = cs.step(state, grads, lr)
        local = reference.apply_gradients(config, before, grads, decay_mask=decay_mask, lr_override=lr)
        ref = reference.apply_gradients(config, ref, grads, decay_mask=decay_mask, lr_override=lr)
        host = cs.host(state)
        iterations.append((int(host[("iterations", None)]), int(ref.iterations)))
        for s, want in ((s, local) for s in slots):
            s.update(k + 1, host[(s.role, s.var)], _slot(want, s))
        for s in trajectory:
            s.update(k + 1, host[(s.role, s.var)], _slot(ref, s))
        bounds.step(k, lrs[-1], trajectory)
    return Result(config, variables, mesh, steps, slots, iterations, lrs, clipped, cs, host, ref, trajectory)


def assert_matches(result: Result, *, rtol: float = 1e-6, ulps: float = 2.0) -> None:
    """docs/numerics.md §4: iterations equal after every step; per step (reference fed the
    program's state) float32/float64 within rtol * scale and 16-bit within `ulps` ulp of the
    scale; over the trajectory float32/float64 within rtol * scale and 16-bit within
    `TrajectoryBound` (derived from `ulps`)."""
    failures = []
    for k, (got, want) in enumerate(result.iterations, 1):
        if got != want:
            failures.append(f"iterations after step {k}: compiled {got}, reference {want}")
            break
    for s in result.slots:
        where = f"{s.label} ({s.dtype}) in step {s.step} of {result.steps}, from the program's state before it"
        if s.is_16bit:
            if not s.ulps <= ulps:
                failures.append(f"{where}: error {s.err:.6g} = {s.ulps:.3g} ulp of the scale max|ref| {s.scale:.6g} "
                                f"(allowed {ulps} ulp per step)")
        elif not s.rel <= rtol:
            failures.append(f"{where}: error {s.err:.6g} = {s.rel:.3g} x the scale max|ref| {s.scale:.6g} "
                            f"(allowed rtol {rtol:g})")
    for t in result.trajectory:
        where = f"{t.label} ({t.dtype}) over {result.steps} steps from the same initial state"
        if t.is_16bit:
            if not t.of_bound <= 1.0:
                failures.append(f"{where}: error {t.of_bound:.3g} x the derived bound (TrajectoryBound, "
                                f"docs/numerics.md §4); worst {t.ulps:.3g} ulp of the scale at step {t.step}")
        elif not t.rel <= rtol:
            failures.append(f"{where}: error {t.err:.6g} at step {t.step} = {t.rel:.3g} x the scale max|ref| "
                            f"{t.scale:.6g} (allowed rtol {rtol:g})")
    if failures:
        raise AssertionError(f"compiled step differs from the reference ({result.config!r} on mesh "
                             f"'{result.mesh}'):\n  " + "\n  ".join(failures))


# ---- the trajectory bound ---------------------------------------------------------------


def _ref_state(host: dict[tuple[str, int | None], np.ndarray], n: int, use_ema: bool) -> reference.RefState:
    """The program's state as a reference state (copies: the reference must own its arrays)."""
    return reference.RefState(
        iterations=int(host[("iterations", None)]),
        variables=[np.array(host[("variable", i)]) for i in range(n)],
        momenta=[np.array(host[("momentum", i)]) for i in range(n)],
        averages=[np.array(host[("average", i)]) for i in range(n)] if use_ema else None,
    )


def _slot(state: reference.RefState, s: SlotError) -> np.ndarray:
    return {"variable": state.variables, "momentum": state.momenta, "average": state.averages}[s.role][s.var]


class TrajectoryBound:
    """How far the compiled trajectory may drift from an independent reference run, per slot.

    Derivation (docs/numerics.md §4). With the gradients fixed, the exact step E is affine in
    the state s = (var, m, avg): E(s) = A s + b (clipping depends on the gradients only). The
    reference computes R(s) = E(s) + rho(s), rho its rounding errors; the program C(s). With
    x_k the program's and y_k the reference's state after step k, e_k = x_k - y_k is

        e_k = [C(x) - R(x)] + [R(x) - R(y)] = delta_k + A e_{k-1} + rho(x) - rho(y),   x, y = x_{k-1}, y_{k-1}

    - delta_k, the per-step error, is at most `ulps` ulp of the slot's scale (the per-step check);
    - |rho(x) - rho(y)| is at most 1 ulp (half an ulp in each run) per rounding whose inputs
      depend on the state; roundings of gradient-only terms (-g*lr, the clip) are the same in
      both runs and cancel. Per slot: m = T(T(m*mom) + t): 2; var: weight decay
      T(var - T(T(var*wd)*lr)): 3, the update T(var + m): 1, Nesterov's T(t + T(m*mom)): 2 at
      the momentum's magnitude (|t| <= (1 + mom) max|m|, so 2 ulp of its scale each);
      avg = T(T(e*avg) + T(d*var)): 3. Each is counted at the slot's running max|x|, |y|, above
      every value it rounds;
    - A's entries per variable: m <- mom*m; var <- (1 - lr*wd)*var + m_new (Nesterov: mom*m_new),
      with 0 <= lr*wd <= 1 here so |1 - lr*wd| <= 1; avg <- e*avg + d*var_new; an EMA overwrite
      makes var a copy of avg (var's bound becomes avg's).

    So per step, with U = ulp(scale) of each slot and a = `ulps`:
        B_m = mom B_m + (a + 2) U_m
        B_v = |1 - lr wd| B_v + (mom if nesterov else 1) B_m + (a + n_v) U_v (+ 4 U_m with Nesterov)
        B_a = e B_a + d B_v + (a + 3) U_a;       B_v = B_a after an overwrite
    with n_v = 1 (+3 with weight decay on that variable). B starts at 0 (same initial state).
    """

    def __init__(self, config: Any, variables: Sequence[VarSpec], *, ulps: float = 2.0):
        self.config, self.variables, self.a = config, list(variables), float(ulps)
        n = len(self.variables)
        self.b = {(role, i): 0.0 for role in ("variable", "momentum", "average") for i in range(n)}

    def step(self, k: int, lr: float, trajectory: Sequence[SlotError]) -> None:
        """Advances the bounds over step k (0-based) and records them on the 16-bit slots."""
        c, a, b = self.config, self.a, self.b
        slot = {(s.role, s.var): s for s in trajectory}
        for i, v in enumerate(self.variables):
            dt = numpy_dtype(v.dtype)

            def unit(role: str) -> float:
                s = slot.get((role, i))
                return ulp(s.both_scale, dt) if s is not None else 0.0

            mom = float(reference.cast_T(c.momentum, dt))
            b["momentum", i] = mom * b["momentum", i] + (a + 2) * unit("momentum")
            decays = c.weight_decay is not None and v.decay
            keep = abs(1.0 - float(reference.cast_T(lr, dt)) * float(reference.cast_T(c.weight_decay, dt))) \
                if decays else 1.0
            n_v = 1 + (3 if decays else 0)
            carried = (mom if c.nesterov else 1.0) * b["momentum", i]
            nesterov_terms = 4 * unit("momentum") if c.nesterov else 0.0
            b["variable", i] = keep * b["variable", i] + carried + (a + n_v) * unit("variable") + nesterov_terms
            if c.use_ema:
                e = float(reference.to_T(c.ema_momentum, dt))
                d = float(reference.to_T(1.0 - float(c.ema_momentum), dt))
                b["average", i] = e * b["average", i] + d * b["variable", i] + (a + 3) * unit("average")
                if reference.ema_overwrite(k, c.ema_overwrite_every):
                    b["variable", i] = b["average", i]
        for key, s in slot.items():
            s.check_bound(b[key])
