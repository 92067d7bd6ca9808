"""The generator emits a verifying stage-0 module for every combination of options, and the
default pipeline lowers each to one partitioned step (the IR shape; numbers are in
test_numerics / test_partitioned)."""

from __future__ import annotations

import itertools

import pytest

from sgdgen.frontend import schedules
from sgdgen.frontend.config import SGDConfig
from sgdgen.codegen.generate import GenerateError, generate, generate_text, template_names
from sgdgen.codegen.pipeline import run_pipeline
from sgdgen.frontend.spec import Mesh, VarSpec

MESH = Mesh.parse("batch=2,model=4")
VARS = [
    VarSpec.create("dense/kernel", [8, 16], "float32", MESH, ["unsharded", "model"]),
    VarSpec.create("dense/bias", [16], "float32", MESH, None, decay=False),
    VarSpec.create("scale", [], "float32", MESH),
    VarSpec.create("conv", [4, 8, 2], "float32", MESH, ["batch", "model", "unsharded"]),
]
CLIPS = [{}, {"clipnorm": 1.0}, {"clipvalue": 0.5}, {"global_clipnorm": 1.0}, {"clipnorm": 1.0, "clipvalue": 0.5}]
UPDATES = [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}]
DECAYS = [{}, {"weight_decay": 0.01}]
EMAS = [{}, {"use_ema": True}, {"use_ema": True, "ema_overwrite_frequency": 3}]
RATES = [0.1, schedules.ExponentialDecay(0.1, 3, 0.5, staircase=True), schedules.PiecewiseConstantDecay([2, 5], [0.1, 0.05, 0.01]),
         schedules.PolynomialDecay(0.1, 10, cycle=True), schedules.InverseTimeDecay(0.1, 3, 0.5),
         schedules.CosineDecay(0.1, 10, warmup_target=0.2, warmup_steps=3), schedules.CosineDecayRestarts(0.1, 5)]
COMBINATIONS = list(itertools.product(CLIPS, UPDATES, DECAYS, EMAS, RATES))
#: skip_nonfinite over every clip and EMA setting (the rule touches clipping, the state and the counter).
SKIP_COMBINATIONS = [(clip, {"momentum": 0.9}, {}, ema, 0.1) for clip in CLIPS for ema in EMAS]


def config_of(combo: tuple, **extra: bool) -> SGDConfig:
    clip, update, decay, ema, lr = combo
    return SGDConfig.create(learning_rate=lr, **clip, **update, **decay, **ema, **extra)


def test_every_option_combination_verifies() -> None:
    """5 clips x 3 updates x 2 decays x 3 EMA settings x 7 learning rates = 630 modules."""
    assert len(COMBINATIONS) == 630
    for combo in COMBINATIONS:
        module = generate(config_of(combo), VARS, MESH)  # parses and verifies, or raises
        assert "func.func public @main" in str(module)


@pytest.mark.parametrize("k", range(0, len(COMBINATIONS), 45))
def test_a_spread_of_combinations_lowers_to_one_partitioned_step(k: int) -> None:
    config = config_of(COMBINATIONS[k])
    text = run_pipeline(generate_text(config, VARS, MESH))
    assert text.count("sdy.manual_computation") == 1
    assert "func.call" not in text
    assert text.count("stablehlo.all_reduce") == (1 if config.clip_mode in ("clipnorm", "global_clipnorm") else 0)
    assert text.count("tf.aliasing_output") == 1 + len(VARS) * (3 if config.use_ema else 2)


@pytest.mark.parametrize("k", range(0, len(SKIP_COMBINATIONS), 2))
def test_skip_nonfinite_lowers_to_one_step_with_one_all_reduce(k: int) -> None:
    """The non-finite count rides in the norms' all_reduce, or is the one all_reduce without a norm."""
    config = config_of(SKIP_COMBINATIONS[k], skip_nonfinite=True)
    text = run_pipeline(generate_text(config, VARS, MESH))
    assert text.count("sdy.manual_computation") == 1 and "func.call" not in text
    assert text.count("stablehlo.all_reduce") == 1
    assert text.count("tf.aliasing_output") == 2 + len(VARS) * (3 if config.use_ema else 2)


def test_every_template_is_used_by_some_combination() -> None:
    used = set()
    for combo, extra in [*((c, {}) for c in COMBINATIONS), *((c, {"skip_nonfinite": True}) for c in SKIP_COMBINATIONS)]:
        text = generate_text(config_of(combo, **extra), VARS, MESH)
        used |= {name for name in template_names() if f'sgdgen.stage = "{_stage(name)}"' in text}
    assert used == set(template_names()) - {"module"}


def _stage(template: str) -> str:
    if template.startswith("lr_"):
        return "learning_rate"
    return template  # update_momentum renders "update_momentum" (and "update_plain" with momentum 0)


def test_errors_name_the_variable_and_the_fix() -> None:
    with pytest.raises(GenerateError, match="no variables"):
        generate_text(SGDConfig.create(), [], MESH)
    with pytest.raises(GenerateError, match=r"'dense/kernel' is listed twice"):
        generate_text(SGDConfig.create(), [VARS[0], VARS[0]], MESH)
    other = VarSpec.create("w", [4], "float32", Mesh.parse("x=2"), ["x"])
    with pytest.raises(GenerateError, match=r"'w' is laid out on mesh x=2.*same mesh"):
        generate_text(SGDConfig.create(), [other], MESH)
    mixed = [VARS[0], VarSpec.create("h", [4], "bfloat16", MESH)]
    with pytest.raises(GenerateError, match=r"global_clipnorm.*\['bfloat16', 'float32'\].*use clipnorm"):
        generate_text(SGDConfig.create(global_clipnorm=1.0), mixed, MESH)
