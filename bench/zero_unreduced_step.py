"""Step time: ZeRO step on unreduced gradients vs the unsharded step on reduced gradients, each
forward + jax.grad + step in one jit, 8 simulated CPU devices, mesh data=8."""
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import sgdgen

n_vars, size, reps = (int(a) for a in (sys.argv[1:] or ["8", "1024", "20"]))
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
rng = np.random.default_rng(0)
with jax.set_mesh(mesh):
    params = {f"w{i}": jax.device_put(rng.normal(size=(size, size)).astype(np.float32) / size, NamedSharding(mesh, P()))
              for i in range(n_vars)}
    x = jax.device_put(rng.normal(size=(64, size)).astype(np.float32), NamedSharding(mesh, P("data", None)))
    def loss(p, x):
        return sum(jnp.sum((x @ w) ** 2) for w in p.values())
    for name, zero in (("unsharded, reduced grads", False), ("ZeRO, unreduced grads", True)):
        step = sgdgen.jax_step(dict(learning_rate=1e-3, momentum=0.9, shard_update_over="data" if zero else None), params)
        def train(p, s, x):
            at = jax.tree.map(lambda w: jax.sharding.reshard(w, P(None, None, reduced={"data"})), p) if zero else p
            return step(p, jax.grad(loss)(at, x), s)
        f = jax.jit(train, donate_argnums=(0, 1))
        p, s = jax.tree.map(jnp.copy, params), step.init(params)
        hlo = f.lower(p, s, x).compile().as_text()
        p, s = f(p, s, x); jax.block_until_ready(p)
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); p, s = f(p, s, x); jax.block_until_ready((p, s)); ts.append(time.perf_counter() - t)
        mom = s.momenta[0]
        per_dev = mom.addressable_shards[0].data.nbytes * n_vars
        print(f"{name:26s} median {np.median(ts)*1e3:8.2f} ms  min {min(ts)*1e3:8.2f} ms  momentum bytes/device {per_dev}"
              f"  all-reduce {hlo.count('all-reduce(')} reduce-scatter {hlo.count('reduce-scatter(')} all-gather {hlo.count('all-gather(')}")
