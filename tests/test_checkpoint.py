"""Checkpoints of the optimizer through orbax (sgdgen.io.checkpoint, SGD.save/restore_checkpoint).

Values are compared bit for bit (`tobytes`): a checkpoint stores the arrays, it computes
nothing, so any difference is a bug, whatever the mesh the restore runs on. Training resumed
from a checkpoint must equal training straight through, bit for bit, because the resumed
program sees the same state, gradients and iterations. The kill test SIGKILLs a writer
process while orbax is writing a step (its temporary directory exists) and restores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import sgdgen
from sgdgen.errors import ArtifactError, ConfigError
from sgdgen.frontend.schedules import ExponentialDecay
from sgdgen.io import checkpoint

MESH = sgdgen.Mesh({"batch": 2, "model": 4})
FLAT = sgdgen.Mesh({"x": 8})
ONE = sgdgen.Mesh(())
ROOT = Path(__file__).resolve().parents[1]

# (name, shape, dtype, layout on MESH, layout on FLAT)
VARS = [("dense/kernel", (8, 4), np.float32, ["batch", "model"], ["x", "unsharded"]),
        ("dense/bias", (4,), np.float32, ["model"], ["unsharded"]),
        ("emb", (16, 2), ml_dtypes.bfloat16, ["unsharded", "unsharded"], ["x", "unsharded"])]


def make(mesh: sgdgen.Mesh, seed: int = 0, **config: Any) -> tuple[sgdgen.SGD, list[sgdgen.Variable]]:
    """A built optimizer on `mesh` over VARS (random values), with each variable laid out for that mesh."""
    rng = np.random.default_rng(seed)
    variables = []
    for name, shape, dtype, on_mesh, on_flat in VARS:
        specs = {MESH: on_mesh, FLAT: on_flat}.get(mesh, ["unsharded"] * len(shape))
        value = rng.standard_normal(shape).astype(dtype)
        variables.append(sgdgen.Variable(value, layout=sgdgen.Layout(specs, mesh), name=name))
    cfg = dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, use_ema=True,
               ema_overwrite_frequency=3)
    cfg.update(config)
    opt = sgdgen.SGD(**cfg, mesh=mesh)
    opt.build(variables)
    return opt, variables


def grads(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return [rng.standard_normal(shape).astype(dtype) for _, shape, dtype, _, _ in VARS]


def train(opt: sgdgen.SGD, variables: list[sgdgen.Variable], steps: range) -> None:
    for k in steps:
        opt.apply_gradients(zip(grads(k), variables))


def bits(opt: sgdgen.SGD, variables: list[sgdgen.Variable]) -> list[bytes]:
    """Every state buffer of `opt` and its variables, as bytes (dtype included)."""
    return [v.numpy().tobytes() + str(v.dtype).encode() for v in [*opt.variables, *variables]]


def test_restore_on_other_meshes_is_bit_identical(tmp_path: Path) -> None:
    opt, variables = make(MESH)
    train(opt, variables, range(4))
    assert opt.save_checkpoint(tmp_path) == 4  # default step: iterations
    assert sorted(os.listdir(tmp_path)) == ["4"]  # the temporary directory was renamed away
    saved = bits(opt, variables)
    for mesh in (FLAT, ONE, MESH):
        other, other_vars = make(mesh, seed=7)
        assert bits(other, other_vars) != saved
        other.restore_checkpoint(tmp_path)
        assert bits(other, other_vars) == saved, mesh
        for v in [*other.variables, *other_vars]:  # restored with the restoring optimizer's layouts
            want = v.layout.named_sharding()
            assert v.value.sharding.is_equivalent_to(want, len(v.shape)), v.name
        assert int(other.iterations.numpy()) == 4 and other.iterations.dtype == np.int64


@pytest.mark.parametrize("mesh", [FLAT, ONE], ids=["8", "1"])
def test_resumed_training_equals_training_straight_through(tmp_path: Path, mesh: sgdgen.Mesh) -> None:
    # A schedule (read from iterations in the program) and the EMA overwrite every 3 steps both
    # depend on the restored iterations.
    lr = ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    straight, straight_vars = make(MESH, learning_rate=lr)
    train(straight, straight_vars, range(7))

    first, first_vars = make(MESH, learning_rate=lr)
    train(first, first_vars, range(4))
    first.save_checkpoint(tmp_path)
    resumed, resumed_vars = make(mesh, seed=3, learning_rate=lr)
    resumed.restore_checkpoint(tmp_path)
    train(resumed, resumed_vars, range(4, 7))
    assert bits(resumed, resumed_vars) == bits(straight, straight_vars)


def test_checkpoint_holds_the_config(tmp_path: Path) -> None:
    opt, variables = make(MESH, learning_rate=ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5))
    opt.save_checkpoint(tmp_path, step=11)
    meta = checkpoint.read_metadata(tmp_path)
    assert meta["config"] == opt.get_config()
    assert [v["name"] for v in meta["variables"]] == [name for name, *_ in VARS]
    assert meta["variables"][0]["layout"] == ["batch", "model"]
    again = sgdgen.SGD.from_config(meta["config"], mesh=MESH)
    assert again.get_config() == opt.get_config()
    assert checkpoint.latest_step(tmp_path) == 11


def _refused(opt: sgdgen.SGD, variables: list[sgdgen.Variable], directory: Path, error: type, *words: str) -> None:
    before = bits(opt, variables)
    with pytest.raises(error) as info:
        opt.restore_checkpoint(directory)
    for w in words:
        assert w in str(info.value)
    assert bits(opt, variables) == before  # a refused restore changes nothing


def test_restore_refuses_an_optimizer_whose_variables_differ(tmp_path: Path) -> None:
    opt, variables = make(MESH)
    opt.save_checkpoint(tmp_path)

    renamed = [sgdgen.Variable(v.numpy(), layout=v.layout, name=("dense/weights" if k == 0 else v.name))
               for k, v in enumerate(variables)]
    other = sgdgen.SGD(0.1, momentum=0.9, use_ema=True, mesh=MESH)
    other.build(renamed)
    _refused(other, renamed, tmp_path, ArtifactError, "'dense/weights'", "not in the checkpoint")

    reshaped = [sgdgen.Variable(np.zeros((8, 8), np.float32), layout=variables[0].layout, name="dense/kernel"),
                *[sgdgen.Variable(v.numpy(), layout=v.layout, name=v.name) for v in variables[1:]]]
    other = sgdgen.SGD(0.1, momentum=0.9, use_ema=True, mesh=MESH)
    other.build(reshaped)
    _refused(other, reshaped, tmp_path, ArtifactError, "'dense/kernel'", "shape [8, 8]", "[8, 4]")

    fewer = [sgdgen.Variable(v.numpy(), layout=v.layout, name=v.name) for v in variables[:2]]
    other = sgdgen.SGD(0.1, momentum=0.9, use_ema=True, mesh=MESH)
    other.build(fewer)
    _refused(other, fewer, tmp_path, ArtifactError, "'emb'")

    no_ema, no_ema_vars = make(MESH, use_ema=False)
    _refused(no_ema, no_ema_vars, tmp_path, ConfigError, "use_ema")


def test_errors_before_anything_is_written_or_read(tmp_path: Path) -> None:
    opt = sgdgen.SGD(0.1)
    with pytest.raises(RuntimeError, match="build"):
        opt.save_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match="build"):
        opt.restore_checkpoint(tmp_path)
    built, variables = make(ONE)
    with pytest.raises(ArtifactError, match="no complete checkpoint"):
        built.restore_checkpoint(tmp_path / "empty")
    built.save_checkpoint(tmp_path, step=2)
    with pytest.raises(ArtifactError, match="already exists"):
        built.save_checkpoint(tmp_path, step=2)
    with pytest.raises(ArtifactError, match=r"holds steps \[2\]"):
        built.restore_checkpoint(tmp_path, step=5)
    with pytest.raises(ConfigError, match="sgdgen_state"):
        built.save_checkpoint(tmp_path, step=3, sgdgen_state=ocp.args.JsonSave({}))
    with pytest.raises(TypeError, match="CheckpointManager"):
        built.save_checkpoint(3.5)


def test_through_the_users_own_checkpoint_manager(tmp_path: Path) -> None:
    opt, variables = make(MESH)
    train(opt, variables, range(2))
    model = {"head": jax.numpy.arange(6.0)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path, options=options) as manager:
        opt.save_checkpoint(manager, step=2, model=ocp.args.StandardSave(model))
        train(opt, variables, range(2, 3))
        opt.save_checkpoint(manager, step=3, model=ocp.args.StandardSave(model))
        assert manager.all_steps() == [2, 3]
    saved = bits(opt, variables)
    other, other_vars = make(FLAT, seed=5)
    with ocp.CheckpointManager(tmp_path, options=options) as manager:
        extra = other.restore_checkpoint(manager, model=ocp.args.StandardRestore(model))
    assert bits(other, other_vars) == saved
    assert np.array_equal(extra["model"]["head"], model["head"])

    # The items alone, for a Composite the user builds: orbax restores sgdgen's pytree directly.
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            checkpoint.state_tree(opt.iterations.value, [v.value for v in variables],
                                                  [m.value for m in opt.variables[4:]],
                                                  [a.value for a in opt.variables[1:4]]))
    with ocp.CheckpointManager(tmp_path, options=options) as manager, jax.enable_x64(True):
        out = manager.restore(3, args=ocp.args.Composite(**checkpoint.restore_args(abstract)))
    assert out[checkpoint.META_ITEM]["config"] == opt.get_config()
    assert out[checkpoint.STATE_ITEM]["variables"][0].tobytes() == variables[0].numpy().tobytes()


_WRITER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    import sgdgen
    mesh = sgdgen.Mesh({"batch": 2, "model": 4})
    w = sgdgen.Variable(np.zeros((2048, 1024), np.float32), layout=sgdgen.Layout(["batch", "model"], mesh), name="w")
    opt = sgdgen.SGD(1.0, mesh=mesh)
    g = np.ones((2048, 1024), np.float32)
    for step in range(1, 200):
        opt.apply_gradients([(g, w)])   # w = -step exactly (momentum 0, lr 1)
        opt.save_checkpoint(sys.argv[1])
        print(step, flush=True)
""")


def test_a_writer_killed_mid_save_leaves_the_last_complete_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory)], stdout=subprocess.PIPE, text=True,
                            env=env)
    killed_during: list[str] = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "1", "the writer did not complete its first checkpoint"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed_during:
            partial = [n for n in os.listdir(directory) if "tmp" in n]
            if partial:  # orbax is writing a step: kill it now
                os.kill(proc.pid, signal.SIGKILL)
                killed_during = partial
            time.sleep(0.001)
        assert killed_during, "never saw orbax's temporary directory within 120 s"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial_step = int(killed_during[0].split(".")[0])
    complete = checkpoint.latest_step(directory)
    assert complete is not None and complete < partial_step  # the partial write is not a step
    print(f"killed while writing step {partial_step}; latest complete step {complete}")

    w = sgdgen.Variable(np.full((2048, 1024), 7, np.float32), layout=sgdgen.Layout(["x", "unsharded"], FLAT), name="w")
    opt = sgdgen.SGD(1.0, mesh=FLAT)
    opt.build([w])
    opt.restore_checkpoint(directory)
    assert int(opt.iterations.numpy()) == complete
    assert np.array_equal(w.numpy(), np.full((2048, 1024), -complete, np.float32))
    opt.save_checkpoint(directory, step=partial_step)  # the step that was cut off can be written again
    assert checkpoint.latest_step(directory) == partial_step


def test_the_skipped_steps_counter_is_checkpointed(tmp_path: Path) -> None:
    """With skip_nonfinite the counter of skipped steps is part of the state: saved, restored (on
    another mesh), and 0 when restoring a checkpoint written without the option."""
    opt, variables = make(MESH, skip_nonfinite=True)
    train(opt, variables, range(2))
    bad = grads(2)
    bad[0][0, 0] = np.nan
    opt.apply_gradients(zip(bad, variables))
    assert int(opt.skipped_steps.numpy()) == 1
    opt.save_checkpoint(tmp_path / "with", step=3)
    again, vs2 = make(FLAT, seed=5, skip_nonfinite=True)
    again.restore_checkpoint(tmp_path / "with")
    assert int(again.skipped_steps.numpy()) == 1 and bits(again, vs2) == bits(opt, variables)
    plain, vs3 = make(MESH)
    train(plain, vs3, range(2))
    plain.save_checkpoint(tmp_path / "without", step=2)
    into, vs4 = make(ONE, seed=6, skip_nonfinite=True)
    into.apply_gradients(zip(bad, vs4))  # one skipped step before the restore
    into.restore_checkpoint(tmp_path / "without")
    assert int(into.skipped_steps.numpy()) == 0 and bits(into, vs4) == bits(plain, vs3)
    back, vs5 = make(ONE, seed=7)  # a counter the target does not keep is read and dropped
    back.restore_checkpoint(tmp_path / "with")
    assert bits(back, vs5) == bits(opt, variables)
