"""`sgdgen bench`: the compiled step against optax in the same process, and against the
memory-bandwidth bound.

Three measurements per model, all on this process's first device:
- cold start: sgdgen compile from source (empty caches), load from an artifact, and the
  first step after each; optax's jax.jit trace + compile of the same update;
- steady state: median ms per step over `steps` steps (results blocked on), sgdgen vs
  `jax.jit(optax update, donate_argnums)`;
- bandwidth: bytes a step must move (read var, grad, momentum[, average]; write var,
  momentum[, average]) over the step time, against a measured device copy bandwidth.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MODELS: dict[str, list[tuple[int, ...]]] = {
    "demo-mlp (4 vars, 1.2k params)": [(16, 64), (64,), (64, 1), (1,)],
    "400 small vars (1.6M params)": [(64, 64)] * 200 + [(64,)] * 200,
    "8 x 1M (8.4M params)": [(1024, 1024)] * 8,
}


@dataclass
class BenchRow:
    model: str
    variables: int
    parameters: int
    sgdgen_compile_s: float
    sgdgen_first_step_after_compile_ms: float
    sgdgen_load_s: float
    sgdgen_first_step_after_load_ms: float
    optax_trace_compile_s: float
    sgdgen_step_ms: float
    optax_step_ms: float
    sgdgen_gb_per_s: float
    copy_gb_per_s: float


def _median_ms(fn: Callable[[], Any], steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _copy_bandwidth(nbytes: int) -> float:
    """GB/s of a device-side copy of `nbytes` (read + write), the bound a step can reach."""
    import jax
    import jax.numpy as jnp

    box = [jnp.ones(nbytes // 4, jnp.float32)]
    f = jax.jit(lambda a: a * 1.0000001, donate_argnums=0)  # in place, like the step

    def copy() -> None:
        box[0] = f(box[0])
        box[0].block_until_ready()

    copy()
    ms = _median_ms(copy, 20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@contextmanager
def scratch_cache() -> Iterator[str]:
    """A temporary directory under which each model gets an empty executable cache (cold starts).

    sgdgen's process-wide cache and SGDGEN_CACHE_DIR are put back as they were before the
    directory is removed; JAX's own configuration is never touched.
    """
    from sgdgen.runtime.cache import default_cache, set_default_cache

    previous = default_cache()
    env = os.environ.get("SGDGEN_CACHE_DIR")
    parent = tempfile.mkdtemp(prefix="sgdgen-bench-")
    try:
        yield parent
    finally:
        set_default_cache(previous)
        if env is None:
            os.environ.pop("SGDGEN_CACHE_DIR", None)
        else:
            os.environ["SGDGEN_CACHE_DIR"] = env
        shutil.rmtree(parent, ignore_errors=True)


def bench_model(name: str, shapes: list[tuple[int, ...]], *, steps: int = 30, cache_root: str | None = None) -> BenchRow:
    """Measures one model (see the module docstring); its caches start empty under `cache_root`
    (which must outlive every compile of the process while it is configured: `scratch_cache`)."""
    if cache_root is None:
        with scratch_cache() as root:
            return bench_model(name, shapes, steps=steps, cache_root=root)
    import jax
    import optax

    import sgdgen
    from sgdgen.runtime import program as prog

    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads_host = [rng.standard_normal(s).astype(np.float32) * 0.01 for s in shapes]
    kw = dict(learning_rate=0.01, momentum=0.9, nesterov=True, global_clipnorm=1.0)

    cache = tempfile.mkdtemp(prefix="xla-", dir=cache_root)
    with tempfile.TemporaryDirectory() as art_dir:
        os.environ["SGDGEN_CACHE_DIR"] = cache
        prog.clear_memory_cache()
        prog.configure_persistent_cache(cache)
        variables = [sgdgen.Variable(x, name=f"v{i}") for i, x in enumerate(init)]
        opt = sgdgen.SGD(**kw)
        grads = [jax.device_put(g) for g in grads_host]
        t0 = time.perf_counter()
        opt.build(variables)
        p = opt._program(variables, opt.config, [True] * len(variables))
        prog.executable_for(p)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt.apply_gradients(zip(grads, variables))
        jax.block_until_ready([v.value for v in variables])
        first_compile_ms = (time.perf_counter() - t0) * 1e3
        opt.save_artifact(art_dir)
        prog.clear_memory_cache()
        fresh = [sgdgen.Variable(x, name=f"v{i}") for i, x in enumerate(init)]
        t0 = time.perf_counter()
        opt2 = sgdgen.SGD.load_artifact(art_dir, fresh)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt2.apply_gradients(zip(grads, fresh))
        jax.block_until_ready([v.value for v in fresh])
        first_load_ms = (time.perf_counter() - t0) * 1e3

        def sgdgen_step() -> None:
            opt.apply_gradients(zip(grads, variables))
            jax.block_until_ready([v.value for v in variables])

        sgdgen_ms = _median_ms(sgdgen_step, steps)

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.01, momentum=0.9, nesterov=True))
    params = [jax.device_put(x) for x in init]
    state = tx.init(params)

    def update(params: Any, state: Any, grads: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    t0 = time.perf_counter()
    jitted = jax.jit(update, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    optax_compile_s = time.perf_counter() - t0
    box = [params, state]

    def optax_step() -> None:
        box[0], box[1] = jitted(box[0], box[1], grads)
        jax.block_until_ready(box[0])

    optax_step()
    optax_ms = _median_ms(optax_step, steps)
    nparams = sum(int(np.prod(s)) for s in shapes)
    moved = nparams * 4 * (3 + 2)  # read w, g, m; write w, m
    return BenchRow(name, len(shapes), nparams, compile_s, first_compile_ms, load_s, first_load_ms, optax_compile_s,
                    sgdgen_ms, optax_ms, moved / (sgdgen_ms * 1e-3) / 1e9, _copy_bandwidth(max(moved, 1 << 24)))


def run(models: dict[str, list[tuple[int, ...]]] | None = None, *, steps: int = 30) -> list[BenchRow]:
    """Every model, each from empty caches; the process's cache settings are restored afterwards."""
    with scratch_cache() as root:
        return [bench_model(name, shapes, steps=steps, cache_root=root) for name, shapes in (models or MODELS).items()]


def table(rows: list[BenchRow]) -> str:
    """A Markdown table of the rows."""
    head = ("model", "vars", "compile s", "1st step ms", "load s", "1st step after load ms", "optax trace+compile s",
            "sgdgen ms/step", "optax ms/step", "sgdgen GB/s", "copy GB/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.model} | {r.variables} | {r.sgdgen_compile_s:.2f} | {r.sgdgen_first_step_after_compile_ms:.1f}"
                     f" | {r.sgdgen_load_s:.2f} | {r.sgdgen_first_step_after_load_ms:.1f} | "
                     f"{r.optax_trace_compile_s:.2f} | {r.sgdgen_step_ms:.2f} | {r.optax_step_ms:.2f} | "
                     f"{r.sgdgen_gb_per_s:.1f} | {r.copy_gb_per_s:.1f} |")
    return "\n".join(lines)


def as_dicts(rows: list[BenchRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
