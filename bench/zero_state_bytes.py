import os, time
os.environ["XLA_FLAGS"]="--xla_force_host_platform_device_count=8"
import numpy as np, jax, sgdgen
from sgdgen import Variable
from sgdgen.frontend.spec import Mesh, Layout
for n in (1,2,4,8):
    mesh = Mesh(f"data={n}")
    res = {}
    for axis in (None, "data"):
        vs = [Variable(np.ones((1024,1024),np.float32), layout=Layout([None,None], mesh), name=f"w{i}") for i in range(4)]
        opt = sgdgen.SGD(0.1, momentum=0.9, use_ema=True, shard_update_over=axis)
        g = [jax.device_put(np.ones(v.shape,np.float32)*1e-3, v.layout.named_sharding()) for v in vs]
        opt.apply_gradients(zip(g, vs)); jax.block_until_ready(vs[0].value)
        slot_bytes = sum(np.prod(s.value.sharding.shard_shape(s.value.shape))*4 for s in opt.variables[1:])
        t=time.perf_counter()
        for _ in range(20): opt.apply_gradients(zip(g, vs))
        jax.block_until_ready([v.value for v in vs]); res[axis]=(slot_bytes,(time.perf_counter()-t)/20*1e3)
    print(f"N={n} state bytes/device unsharded={res[None][0]} zero={res['data'][0]}  step ms unsharded={res[None][1]:.2f} zero={res['data'][1]:.2f}")
