"""Integrity under hostile and unlucky use (issue 16 items 4-7 and 12, issue 12 item 5).

Each case was a crash (SIGSEGV), a lost state or a partial change; the crash cases run in a
child process on 8 simulated devices and assert a clean exit and an intact state:
- a gradient sharing a device buffer with donated state is copied; two state arrays
  sharing one are refused before anything runs (16.4);
- SIGINT at random times during a step loop never loses the state (16.5);
- threads stepping one optimizer are serialized (16.6 / 12.5);
- set_weights / finalize_variable_values that raise change nothing (16.7);
- apply_gradients under jax.jit / jax.grad says so in sgdgen's words (16.12).
Values are compared bit for bit with an uninterrupted, serial run of the same steps: the
program is deterministic, so the tolerance is zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

import sgdgen
from sgdgen.codegen.abi import StepState
from sgdgen.errors import SgdgenError, StepInputError, StepTypeError, UnknownVariableError
from sgdgen.frontend.spec import Layout, Mesh
from sgdgen.runtime.core import Step

MESH = Mesh({"batch": 2, "model": 4})

#: Child prelude: 8 CPU devices, two variables (one sharded, one replicated), an optimizer with
#: every slot kind, `grads()` fixed gradients and `state()` every variable and slot on the host.
PRELUDE = """
import json, os, sys, threading
import numpy as np, jax
import sgdgen
from sgdgen.frontend.spec import Layout, Mesh
MESH = Mesh({"batch": 2, "model": 4})

def make():
    w = sgdgen.Variable(np.arange(64, dtype=np.float32).reshape(8, 8) / 64,
                        layout=Layout(["unsharded", "model"], MESH), name="w")
    b = sgdgen.Variable(np.ones(8, np.float32), layout=Layout(["unsharded"], MESH), name="b")
    opt = sgdgen.SGD(0.1, momentum=0.9, weight_decay=1e-2, use_ema=True, ema_overwrite_frequency=7)
    return opt, [w, b]

def grads(vs):
    return [jax.device_put(np.full(v.shape, 0.25, np.float32), v.layout.named_sharding()) for v in vs]

def state(opt, vs):
    return [np.asarray(x).tolist() for x in [*(v.numpy() for v in vs), *opt.get_weights()]]

def serial(n):
    opt, vs = make()
    for _ in range(n):
        opt.apply_gradients(zip(grads(vs), vs))
    return state(opt, vs)
"""


def run_child(body: str, timeout: float = 240, **popen: object) -> subprocess.CompletedProcess | subprocess.Popen:
    """Runs PRELUDE + body in a fresh Python on 8 CPU devices (the test session's cache dir)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = PRELUDE + textwrap.dedent(body)
    if popen:
        return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **popen)
    return subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=timeout)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---- 16.4: shared buffers -------------------------------------------------------------------

def test_gradients_sharing_state_buffers_are_copied_not_crashing(private_xla_cache) -> None:
    """Gradients rebuilt from the variable's and the momentum's shards (SIGSEGV before), a host
    NumPy view of the variable (zero-copy), and the variable's own array: each step runs on a
    copy, matching the same step with a fresh gradient of equal value."""
    r = run_child("""
        out = {}
        rebuilt = lambda a: jax.make_array_from_single_device_arrays(a.shape, a.sharding,
                                                                     [s.data for s in a.addressable_shards])
        for kind in ["variable shards", "momentum shards", "numpy view", "same array"]:
            opt, vs = make()
            ref, rvs = make()
            opt.build(vs)
            for step in range(3):
                (w, b), (gw, gb) = vs, grads(vs)
                if kind == "variable shards":
                    gw = rebuilt(w.value)
                elif kind == "momentum shards":
                    gw = rebuilt(opt._momenta[0].value)
                elif kind == "numpy view":
                    gb = np.asarray(b.value)  # b is replicated: a view of one shard, transferred zero-copy
                else:
                    gw = w.value
                host = [np.array(gw), np.array(gb)]
                opt.apply_gradients([(gw, w), (gb, b)])
                ref.apply_gradients(zip([jax.device_put(h, v.layout.named_sharding()) for h, v in zip(host, rvs)],
                                        rvs))
            out[kind] = state(opt, vs) == state(ref, rvs)
        print(json.dumps(out))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert last_json(r.stdout) == {"variable shards": True, "momentum shards": True, "numpy view": True,
                                   "same array": True}


def test_state_arrays_sharing_a_buffer_are_refused_before_anything_runs(private_xla_cache) -> None:
    """Functional step with a momentum rebuilt from the variable's shards: refused, naming both,
    and nothing donated (every input still readable)."""
    r = run_child("""
        from sgdgen.codegen.abi import StepState
        from sgdgen.errors import StepInputError
        opt, vs = make()
        opt.build(vs)
        step = opt._step(vs, opt.config, [True, True])
        w = vs[0].value
        alias = jax.make_array_from_single_device_arrays(w.shape, w.sharding, [s.data for s in w.addressable_shards])
        st = StepState(opt.iterations.value, (alias, opt._momenta[1].value),
                       tuple(a.value for a in opt._averages))
        try:
            step.apply(st, [v.value for v in vs], grads(vs), np.float32(0.1))
            print(json.dumps({"raised": None}))
        except StepInputError as e:
            readable = all(np.isfinite(np.asarray(x)).all() for x in [w, alias, *opt.get_weights()])
            print(json.dumps({"raised": str(e), "readable": readable}))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["raised"] and "'SGD/m/w'" in out["raised"] and "variable 'w'" in out["raised"], out
    assert out["readable"] is True


def test_a_fed_back_state_is_not_asked_for_its_buffers_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-step cost: once the state is the step's own results, only the new gradients'
    shards are read (results keep their donated arguments' buffers); the learning-rate argument
    is remembered too. A cache of its own: the calls that show results inherit addresses must be
    this test's, not an earlier test's of the same program."""
    from sgdgen import backend
    from sgdgen.runtime.cache import ExecutableCache

    monkeypatch.setattr("sgdgen.runtime.cache._DEFAULT", ExecutableCache(None))

    vs = [sgdgen.Variable(np.ones((4, 8), np.float32), layout=Layout(["unsharded", "model"], MESH), name=f"v{i}")
          for i in range(3)]
    opt = sgdgen.SGD(0.1, momentum=0.9, use_ema=True)
    fresh = lambda: [jax.device_put(np.full(v.shape, 0.5, np.float32), v.layout.named_sharding()) for v in vs]
    opt.apply_gradients(zip(fresh(), vs))  # from host-transferred state: XLA CPU may not reuse every buffer
    opt.apply_gradients(zip(fresh(), vs))  # from the step's own results: it does, and that is recorded
    calls: list[int] = []
    real = backend.buffer_pointers
    monkeypatch.setattr(backend, "buffer_pointers", lambda a, *more: calls.append(id(a)) or real(a, *more))
    gs = fresh()
    opt.apply_gradients(zip(gs, vs))
    assert sorted(calls) == sorted(id(g) for g in gs)


# ---- 16.5: Ctrl-C ---------------------------------------------------------------------------

def test_sigint_at_random_times_never_loses_the_state(private_xla_cache) -> None:
    """SIGINT at random moments of a step loop (20 interrupts): each KeyboardInterrupt leaves
    every variable and slot readable, `iterations` equal to the steps whose results are bound,
    and the state bit-equal to that many uninterrupted steps."""
    interrupts = 20
    child = run_child(f"""
        import faulthandler, signal, time
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's diagnosis of a lost SIGINT
        opt, vs = make()
        opt.apply_gradients(zip(grads(vs), vs))
        done, checks, inside = 1, [], 0
        print("ready", flush=True)
        while len(checks) < {interrupts}:
            try:
                print("armed", flush=True)  # inside the try: a SIGINT from now on is caught below
                while True:
                    opt.apply_gradients(zip(grads(vs), vs))
                    done += 1
            except KeyboardInterrupt as e:
                tb = e.__traceback__
                while tb.tb_next: tb = tb.tb_next
                inside += tb.tb_frame.f_code.co_name == "uninterruptible"
                n = int(opt.iterations.numpy())
                checks.append([n - done, state(opt, vs) == serial(n)])
                done = n  # an interrupt after a step's return, before `done += 1`
                print("checked", flush=True)
        print(json.dumps({{"checks": checks, "inside": inside}}))
    """, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rng = random.Random(16_5)
    lines: queue.Queue[str] = queue.Queue()  # read in a thread: a wait for a line must time out, not hang
    threading.Thread(target=lambda: [lines.put(x) for x in child.stdout], daemon=True).start()

    def line(timeout: float = 240) -> str:
        try:
            return lines.get(timeout=timeout).strip()
        except queue.Empty:
            child.kill()
            raise AssertionError(f"no output from the child for {timeout} s; threads: {diagnosis}; "
                                 f"stderr: {child.stderr.read()[-6000:]}") from None

    resent, diagnosis = 0, []

    def diagnose() -> None:
        """What the child does when a SIGINT raised nothing: each thread's signal mask and wait
        channel, and (through faulthandler) every thread's Python stack on its stderr."""
        for tid in sorted(os.listdir(f"/proc/{child.pid}/task")):
            with contextlib.suppress(OSError):
                status = open(f"/proc/{child.pid}/task/{tid}/status").read().splitlines()
                wchan = open(f"/proc/{child.pid}/task/{tid}/wchan").read()
                diagnosis.append(f"{tid} {wchan} " + " ".join(x for x in status if x.startswith(("State", "Sig"))))
        child.send_signal(signal.SIGUSR1)

    try:
        assert line() == "ready"
        for _ in range(interrupts):
            assert line() == "armed"
            time.sleep(rng.uniform(0.0, 0.05))
            child.send_signal(signal.SIGINT)
            for _ in range(3):  # a SIGINT that raised nothing is sent again (counted, reported below)
                try:
                    got = lines.get(timeout=20).strip()
                    break
                except queue.Empty:
                    resent += 1
                    diagnose() if resent == 1 else None
                    child.send_signal(signal.SIGINT)
            else:
                got = line(timeout=20)
            assert got == "checked", diagnosis
        child.wait(timeout=240)
        out, err = "".join(iter_queue(lines)), child.stderr.read()
    finally:
        child.kill() if child.poll() is None else None
    assert child.returncode == 0, err[-3000:]
    result = last_json(out)
    assert all(lag in (0, 1) and same for lag, same in result["checks"]), result
    print(f"{interrupts} SIGINTs: {result['inside']} landed in a step and were delivered after its bind; "
          f"{resent} sent again after raising nothing for 20 s")


def iter_queue(q: queue.Queue[str]) -> list[str]:
    """What the reader thread has queued, once the child has exited (its stdout closed)."""
    time.sleep(0.2)
    out = []
    while not q.empty():
        out.append(q.get())
    return out


# ---- 16.6 / 12.5: threads -------------------------------------------------------------------

@pytest.mark.parametrize("threads", [2, 4])
def test_threads_stepping_one_optimizer_are_serialized(private_xla_cache, threads: int) -> None:
    """threads x 50 steps on one optimizer (8 devices): no error, iterations == total, and the
    state bit-equal to a serial run of as many steps (identical gradients: order is moot)."""
    r = run_child(f"""
        opt, vs = make()
        opt.build(vs)
        errors = []
        def work():
            try:
                for _ in range(50):
                    opt.apply_gradients(zip(grads(vs), vs))
            except Exception as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=work) for _ in range({threads})]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(json.dumps({{"errors": errors, "iterations": int(opt.iterations.numpy()),
                          "serial": state(opt, vs) == serial(50 * {threads})}}))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert last_json(r.stdout) == {"errors": [], "iterations": 50 * threads, "serial": True}


# ---- 16.7: a call that raises changes nothing ---------------------------------------------------

def _built() -> tuple[sgdgen.SGD, list[sgdgen.Variable]]:
    w = sgdgen.Variable(np.ones((4, 8), np.float32), layout=Layout(["unsharded", "model"], MESH), name="w")
    b = sgdgen.Variable(np.ones(8, np.float32), layout=Layout(["batch"], MESH), name="b")
    opt = sgdgen.SGD(0.1, momentum=0.9, use_ema=True)
    opt.apply_gradients(zip([np.full(v.shape, 0.5, np.float32) for v in (w, b)], (w, b)))
    return opt, [w, b]


@pytest.mark.parametrize("position,bad,error,match", [
    (-1, np.array(["x"] * 8), StepTypeError, "does not convert"),   # the last slot: unconvertible
    (-1, np.ones(8, np.complex64), StepTypeError, "does not convert"),
    (-1, [[1.0, 2.0], [3.0]], StepTypeError, "not an array"),
    (-1, np.ones(3, np.float32), StepInputError, "has shape"),
    (0, 1.5, StepInputError, "finite integer"),
    (0, np.nan, StepInputError, "finite integer"),
    (0, np.uint64(2 ** 63), StepInputError, "finite integer"),
    (0, "3", StepInputError, "finite integer"),
])
def test_set_weights_that_raises_changes_nothing(position: int, bad: object, error: type, match: str) -> None:
    opt, _ = _built()
    before = opt.get_weights()
    new = [np.asarray(x) + 1 for x in before]
    new[0] = np.int64(7)
    new[position] = bad
    with pytest.raises(error, match=match):
        opt.set_weights(new)
    assert all(np.array_equal(a, b) for a, b in zip(opt.get_weights(), before))


def test_set_weights_converts_and_writes_everything() -> None:
    opt, _ = _built()
    new = [np.float64(5.0)] + [np.asarray(x, np.float64) * 2 for x in opt.get_weights()[1:]]
    opt.set_weights(new)
    got = opt.get_weights()
    assert got[0].dtype == np.int64 and int(got[0]) == 5
    assert all(g.dtype == np.float32 and np.array_equal(g, n.astype(np.float32)) for g, n in zip(got[1:], new[1:]))


def test_finalize_with_an_unknown_variable_changes_nothing() -> None:
    opt, (w, b) = _built()
    before = [w.numpy(), b.numpy()]
    stranger = sgdgen.Variable(np.zeros(3, np.float32), name="stranger")
    with pytest.raises(UnknownVariableError, match="stranger"):
        opt.finalize_variable_values([w, b, stranger])
    assert np.array_equal(w.numpy(), before[0]) and np.array_equal(b.numpy(), before[1])
    opt.finalize_variable_values([w, b])
    assert np.array_equal(w.numpy(), opt._averages[0].numpy()) and not np.array_equal(w.numpy(), before[0])


# ---- 16.12: the stateful API under jit ----------------------------------------------------------

@pytest.mark.parametrize("transform", ["jit", "grad"])
def test_apply_gradients_under_a_jax_transformation_says_so(transform: str) -> None:
    opt, (w, b) = _built()
    before = opt.get_weights()

    def f(g: jax.Array) -> jax.Array:
        opt.apply_gradients([(g, w)])
        return (g ** 2).sum()

    g = jax.device_put(np.ones(w.shape, np.float32), w.layout.named_sharding())
    with pytest.raises(StepTypeError, match="the functional step sgdgen.jax_step") as info:
        (jax.jit(f) if transform == "jit" else jax.grad(f))(g)
    assert isinstance(info.value, SgdgenError) and "'w:0'" in str(info.value) and "outside jit" in str(info.value)
    assert all(np.array_equal(a, c) for a, c in zip(opt.get_weights(), before))


# ---- the functional core's own state ----------------------------------------------------------

def test_init_state_owns_its_buffers() -> None:
    """Step.init copies: an EMA average made from a replicated variable's NumPy view would share
    its buffer (a zero-copy transfer), which the step would then refuse."""
    opt, vs = _built()
    step = Step(opt._step(vs, opt.config, [True, True]).program)
    from sgdgen import backend

    params = [jax.device_put(np.ones(v.shape, np.float32), v.layout.named_sharding()) for v in vs]
    state = step.init(params)
    seen = [set(backend.buffer_pointers(x)) for x in [*params, *state.momenta, *state.averages]]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    gs = [jax.device_put(np.ones(v.shape, np.float32), v.layout.named_sharding()) for v in vs]
    _, new_state = step.apply(state, params, gs, np.float32(0.1))
    assert isinstance(new_state, StepState) and int(new_state.iterations) == 1
