"""The step on several processes: 2 processes x 4 CPU devices over jax.distributed (loopback,
gloo collectives), one 2x4 mesh spanning both, against 1 process with 8 devices.

The test starts both processes itself (this file, run as a script, is the worker), bounds
them in time and reports a hung or failed peer as a failure with its output, killing the
other one. Each worker trains TRAIN_STEPS steps (the stateful `SGD`, then the same through
`sgdgen.jax_step` inside a jit) of a config that uses every cross-device collective of the step (global_clipnorm's norm all_reduce across both processes, weight
decay, Nesterov, EMA with overwrite), gathers the state with `process_allgather`, and saves
and restores an orbax checkpoint across the two processes (into a different layout).
The same training in this process, on 8 local devices, must give the same bits: the
program, its partitioning and the per-device inputs are the same, and an all_reduce of 8
partial sums is exact enough here that both runs round identically (measured; should a
backend change the reduction order, the failure shows the worst difference in ulps).
The checkpoint the two processes wrote is then restored here, on 8 devices and on 1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 4
TIMEOUT_S = 240  # both workers together: start-up (~5 s each), compile, 4 steps, a checkpoint
SHAPES = {"dense/kernel": ((8, 4), ["batch", "model"]), "dense/bias": ((4,), ["model"]),
          "emb": ((6, 2), ["unsharded", "unsharded"])}
CONFIG = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, global_clipnorm=0.5, use_ema=True,
              ema_overwrite_frequency=3)


def train(mesh: Any) -> tuple[Any, list[Any]]:
    """TRAIN_STEPS steps on `mesh` from fixed values and gradients (host arrays, the same in every
    process: each places its own shards). Returns (optimizer, variables)."""
    import numpy as np

    import sgdgen

    rng = np.random.default_rng(0)
    variables = [sgdgen.Variable(rng.standard_normal(shape).astype(np.float32), layout=sgdgen.Layout(specs, mesh),
                                 name=name) for name, (shape, specs) in SHAPES.items()]
    opt = sgdgen.SGD(**CONFIG, mesh=mesh)
    for _ in range(TRAIN_STEPS):
        grads = [rng.standard_normal(v.shape).astype(np.float32) for v in variables]
        opt.apply_gradients(zip(grads, variables))
    return opt, variables


def gathered(opt: Any, variables: list[Any]) -> dict[str, Any]:
    """Every state buffer as a global host array (a collective: every process calls it)."""
    import numpy as np
    from jax.experimental import multihost_utils

    return {v.name: np.asarray(multihost_utils.process_allgather(v.value, tiled=True))
            for v in [*opt.variables, *variables]}


def functional_step_across_processes(mesh: Any, stateful: dict[str, Any]) -> None:
    """The same training through `sgdgen.jax_step` inside a jit spanning both processes (global
    arrays from each process's shards), equal to the stateful run within 1e-6 of max|ref|: the same
    program, with the variables in the pytree's (sorted) order, so the norm's partials are summed
    in another order (the wide float64 sum makes that a last-bit difference at most)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import sgdgen

    def global_array(host: Any, sharding: Any) -> Any:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    rng = np.random.default_rng(0)  # the draws of `train`: the values, then each step's gradients
    init = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in SHAPES.items()}
    shardings = {name: sgdgen.Layout(specs, mesh).named_sharding() for name, (_, specs) in SHAPES.items()}
    params = {name: global_array(init[name], shardings[name]) for name in SHAPES}
    step = sgdgen.jax_step(CONFIG, params)
    state = jax.jit(step.init)(params)
    train_step = jax.jit(lambda p, g, s: step(p, g, s, 0.1), donate_argnums=(0, 2))
    for _ in range(TRAIN_STEPS):
        grads = {name: global_array(rng.standard_normal(shape).astype(np.float32), shardings[name])
                 for name, (shape, _) in SHAPES.items()}
        params, state = train_step(params, grads, state)
    for name in SHAPES:
        got = np.asarray(multihost_utils.process_allgather(params[name], tiled=True))
        want = stateful[f"{name}:0"]
        assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), f"jax_step across processes: {name}"


def worker(port: int, process_id: int, out: Path) -> None:
    """One of the two processes: train, gather, checkpoint across both, restore into another layout."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    import numpy as np

    import sgdgen

    assert jax.process_count() == 2 and len(jax.local_devices()) == 4 and len(jax.devices()) == 8
    # The mesh over the global devices, in jax.devices() order (their ids are not 0..7 on two processes).
    mesh = sgdgen.Mesh.of(jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "model")))
    opt, variables = train(mesh)
    assert not variables[0].value.is_fully_addressable  # the variable really spans both processes
    state = gathered(opt, variables)
    functional_step_across_processes(mesh, state)
    opt.save_checkpoint(out / "ckpt")  # every process writes its shards; orbax commits once

    flat = sgdgen.Mesh.of(jax.sharding.Mesh(np.array(jax.devices()), ("x",)))
    again = [sgdgen.Variable(np.zeros(v.shape, np.float32), layout=sgdgen.Layout.replicated(flat, len(v.shape)),
                             name=v.name) for v in variables]
    restored = sgdgen.SGD(**CONFIG, mesh=flat)
    restored.build(again)
    restored.restore_checkpoint(out / "ckpt")
    after = gathered(restored, again)
    assert all(after[k].tobytes() == state[k].tobytes() for k in state), "restore across processes differs"
    if process_id == 0:
        np.savez(out / "state.npz", **{k.replace("/", "|"): v for k, v in state.items()})
    jax.distributed.shutdown()
    print(f"worker {process_id} done", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path) -> list[str]:
    """Starts both workers and waits for both; kills both and fails on a hang or an error."""
    import pytest

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    logs = [out / f"worker{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, __file__, str(port), str(i), str(out)], stdout=f,
                                          stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                break
            time.sleep(0.2)
    finally:
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    texts = [log.read_text() for log in logs]
    report = "\n".join(f"--- worker {i} (exit {p.returncode}):\n{t[-3000:]}" for i, (p, t) in enumerate(zip(procs, texts)))
    if any(p.returncode != 0 for p in procs):
        what = (f"worker(s) {hung} still running after {TIMEOUT_S} s (a hung peer)" if hung and
                time.monotonic() >= deadline else "a worker failed")
        pytest.fail(f"{what}; killed the rest\n{report}")
    return texts


def test_two_processes_equal_one_process_with_eight_devices(tmp_path: Path) -> None:
    import numpy as np

    import sgdgen

    start = time.monotonic()
    texts = _run_workers(tmp_path)
    print(f"2 processes x 4 devices: {time.monotonic() - start:.1f} s")
    assert all(f"worker {i} done" in t for i, t in enumerate(texts))
    two = {k.replace("|", "/"): v for k, v in np.load(tmp_path / "state.npz").items()}

    opt, variables = train(sgdgen.Mesh({"batch": 2, "model": 4}))
    one = {v.name: v.numpy() for v in [*opt.variables, *variables]}
    assert sorted(one) == sorted(two)
    differ = {k: float(np.max(np.abs(one[k].astype(np.float64) - two[k]))) for k in one
              if one[k].tobytes() != two[k].tobytes()}
    assert not differ, f"1 process vs 2 processes, max |difference| per buffer: {differ}"
    print(f"1 process x 8 devices == 2 processes x 4 devices, bit for bit, over {len(one)} buffers")

    # The checkpoint written by the two processes restores in one, on 8 devices and on 1.
    for mesh in (sgdgen.Mesh({"x": 8}), sgdgen.Mesh(())):
        fresh = [sgdgen.Variable(np.zeros(v.shape, np.float32), layout=sgdgen.Layout.replicated(mesh, len(v.shape)),
                                 name=v.name) for v in variables]
        restored = sgdgen.SGD(**CONFIG, mesh=mesh)
        restored.build(fresh)
        restored.restore_checkpoint(tmp_path / "ckpt")
        got = {v.name: v.numpy() for v in [*restored.variables, *fresh]}
        assert all(got[k].tobytes() == two[k].tobytes() for k in two), mesh


def test_a_hung_peer_is_reported_as_a_failure(tmp_path: Path, monkeypatch: Any) -> None:
    """One worker alone never finds its peer: the run must fail within the bound, naming the hang."""
    import pytest

    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT_S", 15)
    real_popen = subprocess.Popen
    started: list[Any] = []

    def only_first(args: list[str], **kw: Any) -> Any:
        if args[3] == "1":  # worker 1 "hangs" before it ever connects
            args = [sys.executable, "-c", "import time; time.sleep(600)"]
        started.append(real_popen(args, **kw))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", only_first)
    begin = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="hung peer"):
        _run_workers(tmp_path)
    assert time.monotonic() - begin < 15 + 40
    assert all(p.poll() is not None for p in started)  # nothing left running



def test_a_variable_from_a_jax_array_owns_a_copy_made_on_the_devices() -> None:
    """What several processes need of placement (a process cannot read other processes' shards,
    so a jax.Array is copied device to device), checked here on 8 local devices: the variable
    and the EMA slot built from it get buffers of their own, and donating them in a step leaves
    the source array alive and unchanged."""
    import jax
    import numpy as np

    import sgdgen

    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    layout = sgdgen.Layout(["batch", "model"], mesh)
    source = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), layout.named_sharding())
    v = sgdgen.Variable(source, layout=layout, name="copied")
    opt = sgdgen.SGD(0.5, use_ema=True, mesh=mesh)
    opt.apply_gradients([(np.ones((8, 4), np.float32), v)])
    assert not source.is_deleted()
    assert np.array_equal(np.asarray(source), np.arange(32, dtype=np.float32).reshape(8, 4))
    assert np.array_equal(v.numpy(), np.asarray(source) - 0.5)
    average = opt.variables[1]
    assert average.name == "SGD/average/copied:0"
    np.testing.assert_allclose(average.numpy(), 0.99 * np.asarray(source) + 0.01 * v.numpy(), rtol=1e-6)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
