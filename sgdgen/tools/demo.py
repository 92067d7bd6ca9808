"""`sgdgen demo`: train a small MLP with data- and model-parallel layouts on the devices
the process has (8 simulated CPU devices through `sgdgen demo`), every optimizer option
on, and check the compiled optimizer against the NumPy reference fed the same gradients.

The mesh fits the device count (`demo_mesh`): 8 or more -> batch=2,model=4; 4 -> 2x2;
2 -> 1x2; 1 -> 1x1 (one device), so `XLA_FLAGS=--xla_force_host_platform_device_count=4
sgdgen demo` runs on 4 devices.

Model: y = relu(x @ W1 + b1) @ W2 + b2 on synthetic regression data. The batch is
sharded over "batch"; W1's columns, b1 and W2's rows over "model" (Megatron-style), b2
replicated. The optimizer: momentum + Nesterov, weight decay (biases excluded),
global_clipnorm, EMA with periodic overwrite, and a cosine schedule with warmup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


#: The demo passes when the compiled optimizer is within this of the reference, relative to the
#: largest weight: docs/numerics.md §4's float32 bound (1e-6 per step) over the demo's 128
#: steps leaves room for compounding; a wrong rule is off by far more (1e-3 and up).
MAX_REL_DIFF = 1e-5


@dataclass
class DemoResult:
    losses: list[float]
    max_abs_diff: float
    max_rel_diff: float
    steps: int
    seconds: float
    compile_seconds: float
    devices: int = 1
    mesh: str = ""
    step_losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        """Mean loss over the first quarter of the steps (one epoch suffices to see it fall)."""
        k = max(1, len(self.step_losses) // 4)
        return float(np.mean(self.step_losses[:k]))

    @property
    def last_loss(self) -> float:
        """Mean loss over the last quarter of the steps."""
        k = max(1, len(self.step_losses) // 4)
        return float(np.mean(self.step_losses[-k:]))

    @property
    def passed(self) -> bool:
        """Matches the reference within MAX_REL_DIFF and the loss fell."""
        return self.max_rel_diff <= MAX_REL_DIFF and self.last_loss < self.first_loss

    def verdict(self) -> str:
        """One line: what was checked, PASS/FAIL, on how many devices."""
        word = "PASS" if self.passed else "FAIL"
        return (f"{word}: compiled SGD vs sgdgen.reference over {self.steps} steps on {self.devices} device"
                f"{'s' if self.devices != 1 else ''} (mesh {self.mesh}): max relative difference "
                f"{self.max_rel_diff:.3g} (allowed {MAX_REL_DIFF:g}), loss (first -> last quarter of the steps) "
                f"{self.first_loss:.4f} -> {self.last_loss:.4f} "
                f"({'fell' if self.last_loss < self.first_loss else 'did not fall'})")


def demo_mesh(device_count: int) -> dict[str, int]:
    """The largest of 2x4, 2x2, 1x2, 1x1 (batch x model) that fits `device_count` devices."""
    if device_count < 1:
        raise RuntimeError("the demo needs at least 1 device; this process has none")
    for batch, model in ((2, 4), (2, 2), (1, 2), (1, 1)):
        if batch * model <= device_count:
            return {"batch": batch, "model": model}
    raise AssertionError("unreachable: 1x1 fits one device")


def run_demo(*, epochs: int = 8, steps_per_epoch: int = 16, batch: int = 64, hidden: int = 64, features: int = 16,
             seed: int = 0, progress: bool = True, console: Any = None) -> DemoResult:
    """Trains the demo model; returns the per-epoch loss and the difference to the reference."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import sgdgen
    from sgdgen import reference
    from sgdgen.runtime.program import STATS

    t_start = time.perf_counter()
    mesh = sgdgen.Mesh(demo_mesh(jax.device_count()))
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
    step_losses: list[float] = []

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
                step_losses.append(epoch_loss[-1])
                bar.update(task, advance=1, epoch=epoch + 1, loss=float(np.mean(epoch_loss)))
            losses.append(float(np.mean(epoch_loss)))
            if console is not None or progress:
                bar.console.print(f"epoch {epoch + 1}: loss {losses[-1]:.5f}")
    diffs = [np.abs(v.numpy() - r) for v, r in zip(variables, state.variables)]
    scale = max(float(np.max(np.abs(r))) for r in state.variables)
    max_abs = max(float(d.max()) for d in diffs)
    return DemoResult(losses, max_abs, max_abs / scale, epochs * steps_per_epoch, time.perf_counter() - t_start,
                      sum(STATS.seconds), mesh.size, str(mesh), step_losses)
