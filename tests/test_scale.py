"""The stages before XLA stay linear in the number of variables (issue 15).

Timing tests on a shared machine need a margin that a real regression still crosses: the
fastest CPU time (`stage_seconds` reads `time.process_time`) of a linear stage grows about 4x
from N to 4N (4-6x measured here: caches), a quadratic one 16x. The bound, 9x, is the
geometric middle of 4 and 16 plus the measured cache effect; the quadratic canonicalize
this guards against grew 14x from 400 to 1,600 variables.
"""

from __future__ import annotations

import math

import pytest

from sgdgen.api.sgd import SGD
from sgdgen.codegen.pipeline import pipeline_for, split_elements
from sgdgen.frontend.spec import Mesh
from sgdgen.tools.benchmark import CONFIG, SCALE_MESHES, fit_exponent, scale_specs, stage_seconds

#: linear: ~4x from N to 4N; quadratic: 16x (see the module docstring).
GROWTH_BOUND = 9.0


def _pass_names(pipeline: str) -> list[str]:
    return split_elements(pipeline.removeprefix("builtin.module(").removesuffix(")"))


def test_stage_seconds_times_every_pass_of_the_pipeline() -> None:
    mesh = Mesh(SCALE_MESHES[8])
    config = SGD(**CONFIG).config
    row = stage_seconds(config, scale_specs(8, mesh), mesh, pipeline_for("batch"))
    passes = _pass_names(pipeline_for("batch"))
    assert list(row) == ["stage0", "parse", *passes, "passes", "before_xla"]
    assert math.isclose(row["passes"], math.fsum(row[p] for p in passes))
    assert math.isclose(row["before_xla"], row["stage0"] + row["parse"] + row["passes"])


def test_scale_specs_shard_every_fourth_variable_on_the_model_axis() -> None:
    mesh = Mesh(SCALE_MESHES[8])
    specs = scale_specs(8, mesh)
    sharded = [i for i, v in enumerate(specs) if v.layout.used_axes]
    assert sharded == [0, 4] and all(specs[i].layout.dims[0] == ("model",) for i in sharded)
    assert not any(v.layout.used_axes for v in scale_specs(8, Mesh(())))


@pytest.mark.parametrize("k", [1.0, 1.5, 2.0])
def test_fit_exponent_recovers_a_power_law(k: float) -> None:
    sizes = [400, 1600, 6400]
    assert math.isclose(fit_exponent(sizes, [3e-5 * n ** k for n in sizes]), k, rel_tol=1e-9)


@pytest.mark.parametrize("devices,shard_over", [(1, None), (8, "batch")])
def test_every_stage_grows_linearly_from_n_to_4n(devices: int, shard_over: str | None) -> None:
    """On one device, and on 2x4 with mixed layouts and the weight update sharded (the
    configuration whose canonicalize and shard pass were quadratic)."""
    mesh = Mesh(SCALE_MESHES[devices] or ())
    config = SGD(**CONFIG).config
    pipeline = pipeline_for(shard_over)
    small, large = 150, 600

    def fastest(n: int) -> dict[str, float]:
        rows = [stage_seconds(config, scale_specs(n, mesh), mesh, pipeline) for _ in range(2)]
        return {k: min(r[k] for r in rows) for k in rows[0]}

    fastest(small)  # warm: templates, dialects, code paths
    a, b = fastest(small), fastest(large)
    growth = {k: b[k] / a[k] for k in a if a[k] > 0.01}  # stages under 10 ms are timer noise here
    assert growth["before_xla"] < GROWTH_BOUND, growth
    assert all(g < GROWTH_BOUND for g in growth.values()), growth
