"""Issue 15's scale target end to end: N variables (mixed small shapes, sgdgen bench's config)
with flat buckets, from `SGD(...)` to the first finished step; then `save_artifact` and, in the
same process with fresh variables, `load_artifact` and its first step. One device, or the 2x4
mesh with every variable replicated (`--devices 8`). Prints one line of seconds.

    python bench/first_step.py                  # 6,400 variables, 1 device
    python bench/first_step.py --devices 8      # the same on 8 simulated CPU devices
    python bench/first_step.py --no-buckets --variables 1600
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variables", type=int, default=6400)
    p.add_argument("--devices", type=int, choices=(1, 8), default=1)
    p.add_argument("--no-buckets", action="store_true", help="one buffer per variable, as before flat buckets")
    args = p.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ["SGDGEN_CACHE_DIR"] = ""  # every executable compiled here, none from disk

    import jax
    import numpy as np

    import sgdgen
    from sgdgen.tools.benchmark import CONFIG

    small = [(160, 160), (256,), (64, 96), (96,)]
    rng = np.random.default_rng(0)
    mesh = sgdgen.Mesh("batch=2,model=4") if args.devices == 8 else None
    host = [rng.standard_normal(small[i % 4]).astype(np.float32) for i in range(args.variables)]

    def variables() -> list[sgdgen.Variable]:
        return [sgdgen.Variable(h, name=f"v{i}", mesh=mesh) for i, h in enumerate(host)]

    vs = variables()
    grads = [jax.device_put(h * np.float32(0.01), v.layout.named_sharding()) for h, v in zip(host, vs)]
    jax.block_until_ready(grads)
    t0 = time.perf_counter()
    opt = sgdgen.SGD(**CONFIG, buckets=not args.no_buckets)
    opt.apply_gradients(zip(grads, vs))
    jax.block_until_ready(vs[-1].value)
    first = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        opt.save_artifact(d)
        save = time.perf_counter() - t0
        vs2 = variables()
        t0 = time.perf_counter()
        loaded = sgdgen.SGD.load_artifact(d, vs2)
        load = time.perf_counter() - t0
        loaded.apply_gradients(zip(grads, vs2))
        jax.block_until_ready(vs2[-1].value)
        after = time.perf_counter() - t0 - load
    print(f"{args.variables} variables, {args.devices} device(s), buckets={not args.no_buckets}: SGD to first step "
          f"{first:.2f} s; save_artifact {save:.2f} s; load_artifact {load:.2f} s, its first step {after:.2f} s")


if __name__ == "__main__":
    main()
