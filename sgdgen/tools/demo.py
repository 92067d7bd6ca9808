"""`sgdgen demo`: train a small MLP with data- and model-parallel layouts on 8 simulated
CPU devices, every optimizer option on, and check the compiled optimizer against the
NumPy reference fed the same gradients.

Model: y = relu(x @ W1 + b1) @ W2 + b2 on synthetic regression data. The batch is
sharded over "batch"; W1's columns, b1 and W2's rows over "model" (Megatron-style), b2
replicated. The optimizer: momentum + Nesterov, weight decay (biases excluded),
global_clipnorm, EMA with periodic overwrite, and a cosine schedule with warmup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DemoResult:
    losses: list[float]
    max_abs_diff: float
    max_rel_diff: float
    steps: int
    seconds: float
    compile_seconds: float


def run_demo(*, epochs: int = 8, steps_per_epoch: int = 16, batch: int = 64, hidden: int = 64, features: int = 16,
             seed: int = 0, progress: bool = True, console: Any = None) -> DemoResult:
    """Trains the demo model; returns the per-epoch loss and the difference to the reference."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import sgdgen
    from sgdgen import reference
    from sgdgen.runtime.program import STATS

    if jax.device_count() < 8:
        raise RuntimeError(f"the demo needs 8 devices, this process has {jax.device_count()}; run it through "
                           "`sgdgen demo`, which sets XLA_FLAGS=--xla_force_host_platform_device_count=8")
    t_start = time.perf_counter()
    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    rng = np.random.default_rng(seed)
    true_w = rng.standard_normal((features, 1)).astype(np.float32)
    init = {
        "dense_1/kernel": (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32),
        "dense_1/bias": np.zeros(hidden, np.float32),
        "dense_2/kernel": (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32),
        "dense_2/bias": np.zeros(1, np.float32),
    }
    layouts = {
        "dense_1/kernel": ["unsharded", "model"],
        "dense_1/bias": ["model"],
        "dense_2/kernel": ["model", "unsharded"],
        "dense_2/bias": ["unsharded"],
    }
    variables = [sgdgen.Variable(v, layout=sgdgen.Layout(layouts[k], mesh), name=k) for k, v in init.items()]
    schedule = sgdgen.frontend.schedules.CosineDecay(0.01, decay_steps=epochs * steps_per_epoch, alpha=0.1,
                                            warmup_target=0.05, warmup_steps=steps_per_epoch)
    opt = sgdgen.SGD(learning_rate=schedule, momentum=0.9, nesterov=True, weight_decay=1e-3, global_clipnorm=1.0,
                     use_ema=True, ema_momentum=0.95, ema_overwrite_frequency=steps_per_epoch * 4, mesh=mesh)
    opt.exclude_from_weight_decay(var_names=["bias"])

    jmesh = mesh.to_jax()
    data_sharding = NamedSharding(jmesh, P("batch", None))
    var_shardings = [v.layout.named_sharding(jmesh) for v in variables]

    def loss_fn(params: list[Any], x: Any, y: Any) -> Any:
        w1, b1, w2, b2 = params
        h = jax.nn.relu(x @ w1 + b1)
        return jnp.mean((h @ w2 + b2 - y) ** 2)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(NamedSharding(jmesh, P()), var_shardings))
    state = reference.build(opt.config, [v.numpy() for v in variables])
    decay = [opt._use_weight_decay(v) for v in variables]
    losses: list[float] = []

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.5f}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=epochs * steps_per_epoch, epoch=1, loss=float("nan"))
        for epoch in range(epochs):
            epoch_loss = []
            for _ in range(steps_per_epoch):
                x = rng.standard_normal((batch, features)).astype(np.float32)
                y = (x @ true_w + 0.1 * rng.standard_normal((batch, 1))).astype(np.float32)
                xs, ys = jax.device_put(x, data_sharding), jax.device_put(y, data_sharding)
                loss, grads = grad_fn([v.value for v in variables], xs, ys)
                host_grads = [np.asarray(g) for g in grads]
                opt.apply_gradients(zip(grads, variables))
                state = reference.apply_gradients(opt.config, state, host_grads, decay_mask=decay)
                epoch_loss.append(float(loss))
                bar.update(task, advance=1, epoch=epoch + 1, loss=float(np.mean(epoch_loss)))
            losses.append(float(np.mean(epoch_loss)))
            if console is not None or progress:
                bar.console.print(f"epoch {epoch + 1}: loss {losses[-1]:.5f}")
    diffs = [np.abs(v.numpy() - r) for v, r in zip(variables, state.variables)]
    scale = max(float(np.max(np.abs(r))) for r in state.variables)
    max_abs = max(float(d.max()) for d in diffs)
    return DemoResult(losses, max_abs, max_abs / scale, epochs * steps_per_epoch, time.perf_counter() - t_start,
                      sum(STATS.seconds))
