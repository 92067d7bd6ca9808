"""The lowered (partitioned, fused, in-place) step on 8 simulated CPU devices.

Each case runs the default pass pipeline over the stage-0 module, compiles it for the
mesh, runs 10 steps and compares every slot with sgdgen.reference (float32: 1e-6 of
max|ref|). The meshes differ in rank and in axis sizes; the models mix replicated
variables, variables sharded on one axis, on two axes over two dimensions, and on two
axes of one dimension, so that the duplicate masking of every norm is exercised.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from support.stepdriver import assert_matches, compile_step, run_against_reference

from sgdgen import backend
from sgdgen.frontend.config import SGDConfig
from sgdgen.codegen.pipeline import run_pipeline
from sgdgen.frontend.schedules import CosineDecay, PiecewiseConstantDecay
from sgdgen.frontend.spec import Mesh, VarSpec

FULL = dict(momentum=0.9, nesterov=True, weight_decay=0.05, use_ema=True, ema_momentum=0.9,
            ema_overwrite_frequency=4)


def model(mesh: Mesh, dtype: str = "float32") -> list[VarSpec]:
    """A mix of layouts that fits any of the test meshes (every size divides 16)."""
    axes = mesh.axis_names
    first, last = axes[0], axes[-1]
    specs = [
        VarSpec.create("dense/kernel", [16, 32], dtype, mesh, ["unsharded", last]),
        VarSpec.create("dense/bias", [32], dtype, mesh, None, decay=False),
        VarSpec.create("scale", [], dtype, mesh),
        VarSpec.create("embed", [16, 8], dtype, mesh, [tuple(axes)] + ["unsharded"]),  # every axis on one dim
        VarSpec.create("conv", [8, 4, 16], dtype, mesh, [first, "unsharded", "unsharded"]),
    ]
    if len(axes) > 1:
        specs.append(VarSpec.create("proj", [16, 16], dtype, mesh, [first, last]))  # two axes, two dims
    return specs


def lowered(text: str) -> str:
    return run_pipeline(text)


MESHES = ["x=8", "batch=2,model=4", "batch=4,model=2", "a=2,b=2,c=2"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
def test_full_combination_on_each_mesh(mesh: str, clip: str) -> None:
    m = Mesh.parse(mesh)
    config = SGDConfig.create(learning_rate=0.1, **FULL, **{clip: 1.0})
    result = run_against_reference(config, model(m), m, steps=10, transform=lowered)
    assert_matches(result)


OPTIONS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "weight_decay": dict(weight_decay=0.1),
    "clipnorm": dict(clipnorm=0.5),
    "clipvalue": dict(clipvalue=0.05),
    "global_clipnorm": dict(global_clipnorm=0.5),
    "ema_overwrite": dict(use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=3),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_alone_on_2x4(name: str) -> None:
    m = Mesh.parse("batch=2,model=4")
    config = SGDConfig.create(learning_rate=0.1, **OPTIONS[name])
    assert_matches(run_against_reference(config, model(m), m, steps=10, transform=lowered))


def test_schedule_and_changing_learning_rate_on_a_mesh() -> None:
    m = Mesh.parse("batch=2,model=4")
    for schedule in (PiecewiseConstantDecay([2, 5], [0.1, 0.05, 0.01]),
                     CosineDecay(0.05, decay_steps=7, warmup_target=0.1, warmup_steps=3)):
        sched = SGDConfig.create(learning_rate=schedule, momentum=0.9, global_clipnorm=1.0)
        assert_matches(run_against_reference(sched, model(m), m, steps=10, transform=lowered))
    flt = SGDConfig.create(learning_rate=0.1, momentum=0.9, clipnorm=1.0)
    assert_matches(run_against_reference(flt, model(m), m, steps=10, transform=lowered,
                                         lr_schedule_of_values=[0.1, 0.2, 0.05] * 4))


def test_bfloat16_on_a_mesh() -> None:
    m = Mesh.parse("batch=2,model=4")
    config = SGDConfig.create(learning_rate=0.1, **FULL, global_clipnorm=1.0)
    assert_matches(run_against_reference(config, model(m, "bfloat16"), m, steps=10, transform=lowered))


def _all_reduces(hlo: str) -> int:
    return len(re.findall(r"\ball-reduce(?:-start)?\(", hlo))


@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
def test_one_all_reduce_for_fifty_sharded_variables(clip: str) -> None:
    m = Mesh.parse("batch=2,model=4")
    layouts = [["unsharded", "model"], ["batch", "unsharded"], ["batch", "model"], [("batch", "model"), None],
               None]
    specs = [VarSpec.create(f"layer{i}/kernel", [8, 16], "float32", m, layouts[i % len(layouts)])
             for i in range(50)]
    config = SGDConfig.create(learning_rate=0.1, momentum=0.9, **{clip: 1.0})
    step = compile_step(config, specs, m, transform=lowered)
    assert _all_reduces(step.exe.hlo_text()) == 1
    assert step.text.count("stablehlo.all_reduce") == 1


def test_in_place_update_reuses_donated_buffers() -> None:
    m = Mesh.parse("batch=2,model=4")
    config = SGDConfig.create(learning_rate=0.1, momentum=0.9, use_ema=True, global_clipnorm=1.0)
    step = compile_step(config, model(m), m, transform=lowered)
    assert backend.input_output_aliases(step.exe.executable) == step.abi.aliases
    rng = np.random.default_rng(0)
    state = step.initial_state([rng.standard_normal(v.shape).astype(np.float32) for v in model(m)])
    grads = [rng.standard_normal(v.shape).astype(np.float32) for v in model(m)]
    state = step.step(state, grads)  # first step from device_put buffers
    before = [[s.data.unsafe_buffer_pointer() for s in a.addressable_shards] for a in state]
    new = step.step(state, grads)
    assert all(a.is_deleted() for a in state)
    after = [[s.data.unsafe_buffer_pointer() for s in a.addressable_shards] for a in new]
    assert before == after


def test_temporary_memory_is_under_one_percent_of_state() -> None:
    """8 tensors of 4M float32 parameters, every option on: XLA's temp buffers vs the state."""
    m = Mesh(())
    specs = [VarSpec.create(f"w{i}", [2048, 2048], "float32", m) for i in range(8)]
    for clip in ("global_clipnorm", "clipnorm"):
        config = SGDConfig.create(learning_rate=0.1, **FULL, **{clip: 1.0})
        step = compile_step(config, specs, m, transform=lowered)
        stats = backend.memory_stats(step.exe.executable)
        state_bytes = sum(v.nbytes for v in specs) * 3 + 8
        assert stats["alias_size_in_bytes"] >= state_bytes - 8
        assert stats["temp_size_in_bytes"] <= 0.01 * state_bytes, stats


@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
@pytest.mark.parametrize("layout", [None, ["model"]], ids=["replicated", "sharded"])
def test_single_variable_norm_is_counted_once(clip: str, layout: list[str] | None) -> None:
    """One variable: its partial is itself the joined norm value, so the mask must come
    before the all_reduce (a replicated variable was once counted 8 times on device 0)."""
    m = Mesh.parse("batch=2,model=4")
    specs = [VarSpec.create("w", [16], "float32", m, layout)]
    config = SGDConfig.create(learning_rate=0.1, momentum=0.9, **{clip: 0.5})
    assert_matches(run_against_reference(config, specs, m, steps=10, transform=lowered))
