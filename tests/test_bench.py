"""`sgdgen bench` and the precision flag the benchmark measures.

The benchmark test checks structure and sanity only (every figure present, finite, timings
positive): timings on a shared CI machine are not asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sgdgen.tools import benchmark

TIMING_KEYS = ("median_ms", "p25_ms", "p75_ms")


def _numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON value, with where it sits."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}[{i}]")]
    return []


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """`sgdgen bench --quick --json --plot FILE` in a new process on one device, as CI runs it."""
    png = tmp_path_factory.mktemp("bench") / "bench.png"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from sgdgen.tools.cli import main; sys.exit(main())",
                           "bench", "--quick", "--json", "--plot", str(png)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "few-large" in proc.stderr  # the table goes to stderr when the JSON takes stdout
    return json.loads(proc.stdout), png


def test_quick_json_has_every_model_contender_and_measurement(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    assert result["quick"] is True and result["command"] == "sgdgen bench --quick"
    assert set(result["models"]) == set(benchmark.models(quick=True))
    for name, model in result["models"].items():
        ran = set(model["contenders"])
        assert {"sgdgen", "sgdgen_artifact", "optax", "keras", "bound"} <= ran, name
        assert ran | set(model["skipped"]) == set(benchmark.COLUMNS), name  # each column ran or says why not
        assert all(isinstance(why, str) and why for why in model["skipped"].values())
        for contender, row in model["contenders"].items():
            for key in TIMING_KEYS + ("x_bound",):
                assert row[key] > 0, (name, contender, key)
            assert row["p25_ms"] <= row["median_ms"] <= row["p75_ms"]
        sg = model["contenders"]["sgdgen"]
        assert {"bytes_per_param", "temp_bytes", "peak_over_state", "all_reduce", "x_best_peer"} <= set(sg)
        assert math.isclose(model["contenders"]["bound"]["x_bound"], 1.0)
    assert result["models"][benchmark.MESH_MODEL]["contenders"]["sgdgen"]["all_reduce"] >= 1  # the global norm
    cold = result["cold_start"]
    for mode in benchmark.COLD_MODES:
        assert 0 < cold[mode]["first_step_s"] < cold[mode]["process_s"]
    sc = result["scale"]
    assert len(sc["variables"]) == len(sc["stage0_s"]) == len(sc["passes_s"]) >= 3
    assert math.isfinite(sc["stage0_exponent"]) and math.isfinite(sc["passes_exponent"])
    program = result["program"]
    assert {"strict", "excess_allowed", "saved_ms"} <= set(program["excess_precision"])
    assert {"float64", "float32_blocked", "float32"} <= set(program["norm_sum"])


def test_quick_json_numbers_are_finite_and_not_negative(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    for m in result["models"].values():
        assert all(c["steps_per_round"] >= 1 for c in m["contenders"].values())
    # a difference (saved_ms) and a fitted exponent may have either sign
    numbers = _numbers({k: v for k, v in result.items() if k not in ("program", "scale")})
    numbers += _numbers({k: v for k, v in result["scale"].items() if not k.endswith("_exponent")})
    assert numbers
    bad = [(p, v) for p, v in numbers if not math.isfinite(v) or v < 0]
    assert not bad
    saved = result["program"]["excess_precision"]["saved_ms"]  # a difference: either sign
    assert math.isfinite(saved)


def test_quick_run_writes_a_png(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, png = quick_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaved_shuffles_the_order_each_round_and_summary_is_the_quartiles() -> None:
    """Every round runs each function its steps in a row, in a seeded order of its own: no
    function follows the same one every round (what a rotation did, and it biased the figures)."""
    def order(seed: int) -> list[str]:
        calls: list[str] = []
        times = benchmark.interleaved({n: (lambda n=n: calls.append(n)) for n in "abcdefgh"}, rounds=9,
                                      per_round=2, seed=seed)
        assert all(len(t) == 9 for t in times.values())
        return calls

    calls = order(0)
    assert calls == order(0) and calls != order(1)  # seeded: a rerun measures the same order
    rounds = [calls[16 * r:16 * r + 16] for r in range(9)]
    assert all(r[0::2] == r[1::2] and sorted(r[0::2]) == list("abcdefgh") for r in rounds)
    before = {n: {r[0::2][i - 1] for r in rounds for i in range(1, 8) if r[0::2][i] == n} for n in "abcdefgh"}
    assert all(len(p) > 1 for p in before.values()), before
    ms = [5.0, 1.0, 3.0, 9.0]
    s = benchmark.summary(ms)
    assert s["median_ms"] == np.median(ms)
    assert (s["p25_ms"], s["p75_ms"]) == tuple(np.percentile(ms, [25, 75]))


def test_cold_start_runs_its_processes_in_shuffled_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round starts one process per mode, in an order of its own, so that a slow spell of the
    machine does not fall on all of one mode's processes; each figure is the median of its mode's."""
    started: list[str] = []

    def child(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
        mode = args[args.index("--cold") + 1]
        started.append(mode)
        return {"first_step_s": float(len(started))}, 10.0 * len(started)

    monkeypatch.setattr(benchmark, "_child", child)
    out = benchmark.cold_start(benchmark.Model("tiny", ((4, 3), (5,))), quick=True, repeats=3)
    modes = len(benchmark.COLD_MODES)
    rounds = [started[modes * r:modes * r + modes] for r in range(3)]
    assert all(sorted(r) == sorted(benchmark.COLD_MODES) for r in rounds), rounds
    assert len({tuple(r) for r in rounds}) > 1  # not the same order every round
    for mode in benchmark.COLD_MODES:
        at = [i + 1 for i, m in enumerate(started) if m == mode]
        assert out[mode] == {"first_step_s": float(np.median(at)), "process_s": 10.0 * np.median(at), "runs": 3}
    assert out["optax_over_load_buckets"] == out["optax"]["first_step_s"] / out["load_buckets"]["first_step_s"]


def test_rounds_last_about_the_same_time_for_every_contender(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast step runs more times a round (a round of ~50 ms, at most 10x `per_round`), a slow
    one `per_round` times, one over 0.2 s once; each count is in the contender's row."""
    took = {"fast": 0.002, "mid": 0.02, "tiny": 1e-7, "slow": 0.5}
    clock, calls = [0.0], {n: 0 for n in took}

    def step(n: str) -> None:  # the first call after a switch is slow: the probe takes the fastest of three
        calls[n] += 1
        clock[0] += took[n] * (4 if calls[n] == 1 else 1)

    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    steps = {n: (lambda n=n: step(n)) for n in took}
    assert benchmark._repeats(steps, per_round=5) == {"fast": 25, "mid": 5, "tiny": 50, "slow": 1}


def test_notes_state_each_target_met_or_missed() -> None:
    def row(ms: float, bound: float, best: float) -> dict[str, float]:
        return {"median_ms": ms, "x_bound": ms / bound, "x_best_peer": ms / best}

    result = {"models": {
        "few-large": {"contenders": {"sgdgen": row(1.1, 1.0, 1.5), "optax": row(1.5, 1.0, 1.5), "bound": row(1, 1, 1.5)}},
        "many-small": {"contenders": {"sgdgen": row(2.0, 1.0, 1.5), "optax": row(1.5, 1.0, 1.5),
                                      "bound": row(1, 1, 1.5)}}}}
    few, many = benchmark.notes(result)
    assert few.endswith(": met") and "1.10x bound" in few
    assert many.endswith(": MISSED") and "2.00x bound" in many
    many_small = result["models"]["many-small"]["contenders"]
    many_small.update(sgdgen_buckets=row(0.5, 1.0, 1.5), sgdgen_buckets_read=row(1.25, 1.0, 1.5))
    _, many = benchmark.notes(result)
    assert "SGD(buckets=True) 3.00x faster than the best peer (target about 3x: met), reading every view " \
           "after it +0.75 ms" in many
    many_small["sgdgen_buckets"] = row(1.0, 1.0, 1.5)
    assert "1.50x faster than the best peer (target about 3x: MISSED)" in benchmark.notes(result)[1]


def test_notes_on_a_gpu_state_its_targets_for_the_fastest_sgdgen_form() -> None:
    """A model that ran on a GPU is judged by issue 15's GPU targets (few-large <= 1.05x,
    many-small <= 1.5x the bound), for sgdgen's fastest form in that run."""
    def row(ms: float) -> dict[str, float]:
        return {"median_ms": ms, "x_bound": ms, "x_best_peer": ms / 2}

    result = {"models": {
        "few-large": {"platform": "gpu", "contenders": {"sgdgen": row(1.2), "sgdgen_jax_step": row(1.04),
                                                        "optax": row(2.0), "bound": row(1.0)}},
        "many-small": {"platform": "gpu", "contenders": {"sgdgen": row(3.0), "sgdgen_flat": row(1.6),
                                                         "optax": row(2.0), "bound": row(1.0)}}}}
    few, many = benchmark.notes(result)
    assert few.endswith("gpu target <= 1.05x bound: fastest form sgdgen_jax_step 1.04x, met")
    assert many.endswith("gpu target <= 1.5x bound: fastest form sgdgen_flat 1.60x, MISSED")


def test_torch_runs_on_the_kind_of_device_jax_runs_on() -> None:
    assert benchmark.torch_device("cpu", cuda=True) == "cpu"
    assert benchmark.torch_device("gpu", cuda=True) == "cuda"
    assert benchmark.torch_device("gpu", cuda=False) is None  # not compared across devices
    assert benchmark.torch_device("tpu", cuda=False) is None


def test_a_mesh_model_runs_on_host_devices_where_the_default_ones_are_too_few(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 simulated host devices always; the CPU platform forced only where the default
    platform is another and has fewer devices than the mesh (one GPU), and the row says so."""
    import jax

    model = benchmark.models(quick=True)[benchmark.MESH_MODEL]
    env = benchmark.mesh_child_env(model, {"XLA_FLAGS": "--xla_foo"})
    assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=8"
    assert "JAX_PLATFORMS" not in env  # this machine's default devices are CPUs

    class Gpu:
        platform = "gpu"

    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu()])
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert benchmark.mesh_child_env(model, {})["JAX_PLATFORMS"] == "cpu"
    result = {"machine": {"platform": "gpu", "device": "NVIDIA H200", "cpu": "x86", "cores": 16}}
    assert benchmark._elsewhere(result, {"platform": "cpu"}) == ", on cpu"
    assert benchmark._elsewhere(result, {"platform": "gpu"}) == ""
    assert benchmark.where(result["machine"]) == "NVIDIA H200 (gpu); host x86, 16 cores"
    assert benchmark.where({"platform": "cpu", "cpu": "x86", "cores": 2}) == "x86, 2 cores"


# ---- excess precision only where a 16-bit variable needs it ----------------------------

def _program(dtypes: list[str], shape: tuple[int, ...] = (4, 4), **config: Any) -> Any:
    from sgdgen.api.sgd import SGD
    from sgdgen.frontend.spec import Mesh, VarSpec
    from sgdgen.runtime.program import StepProgram

    mesh = Mesh(())
    specs = tuple(VarSpec.create(f"v{i}", list(shape), d, mesh) for i, d in enumerate(dtypes))
    return StepProgram(SGD(**(config or dict(learning_rate=0.1, momentum=0.9))).config, specs, mesh)


@pytest.mark.parametrize("dtypes,strict", [(["float32"], False), (["float32", "float64"], False),
                                           (["float32", "bfloat16"], True), (["float16"], True)])
def test_the_cache_compiles_strictly_only_with_a_16_bit_variable(monkeypatch: pytest.MonkeyPatch,
                                                                 dtypes: list[str], strict: bool) -> None:
    from sgdgen import backend
    from sgdgen.runtime.cache import ExecutableCache, needs_strict_precision

    seen: list[bool] = []
    real = backend.compile_text

    def recording(text: str, devices: Any, *, strict_precision: bool = True) -> Any:
        seen.append(strict_precision)
        return real(text, devices, strict_precision=strict_precision)

    monkeypatch.setattr(backend, "compile_text", recording)
    program = _program(dtypes)
    assert needs_strict_precision(program) is strict
    ExecutableCache(None).get(program)
    assert seen == [strict]


def test_precision_is_in_the_options_and_the_cache_key() -> None:
    from sgdgen import backend

    devices = backend.devices_for([0])
    strict = backend.compile_options(devices, strict_precision=True)
    loose = backend.compile_options(devices, strict_precision=False)
    assert ("xla_allow_excess_precision", False) in list(strict.env_option_overrides)
    assert not list(loose.env_option_overrides)
    assert (backend.cache_key_material(devices, strict_precision=True)
            != backend.cache_key_material(devices, strict_precision=False))
    assert backend.compile_options(devices).SerializeAsString() == strict.SerializeAsString()  # the safe default


def test_strict_precision_changes_a_bfloat16_program_and_not_a_float32_one() -> None:
    """Why the flag is kept for 16-bit programs: without it XLA drops the rounding converts of a
    bfloat16 step (fewer `convert`s in the optimized HLO); a float32 step's HLO is unchanged."""
    from sgdgen import backend

    devices = backend.devices_for([0])
    for dtype, changes in (("bfloat16", True), ("float32", False)):
        text = _program([dtype, dtype], (64, 64), **benchmark.CONFIG).lowered_text
        strict, loose = (backend.hlo_text(backend.compile_text(text, devices, strict_precision=s)) for s in (True, False))
        assert (strict != loose) is changes, dtype
        if changes:
            assert strict.count("convert") > loose.count("convert")


def test_ffi_kernel_bytes_count_each_calls_operands_and_results() -> None:
    # XLA's cost analysis says 0 for a custom call: the bench adds what sgdgen's calls read and write
    hlo = """ENTRY %main {
  %g = f32[1024,1024]{1,0} parameter(0)
  %w = f32[1024,1024]{1,0} parameter(1)
  %lr = f32[] parameter(2)
  %n = (f64[], /*index=1*/f64[]) custom-call(%g, /*index=1*/%w), custom_call_target="sgdgen_sum_squares_f32"
  %u = (f32[1024,1024]{1,0}) custom-call(%g, %w, /*index=2*/%lr), custom_call_target="sgdgen_sgd_update_f32"
  %o = f32[1024,1024]{1,0} custom-call(%g), custom_call_target="someone_elses"
}"""
    mib = 1 << 22  # one f32[1024,1024]
    assert benchmark._ffi_bytes(hlo) == (16 + 2 * mib) + (mib + 2 * mib + 4)  # results + operands, per call


def test_plot_gives_every_column_a_look_of_its_own() -> None:
    """The plot's legend tells the columns apart: no two share colour and hatch (a 10-colour cycle
    over 13 columns once drew `sgdgen` and `torch_fused` alike)."""
    from matplotlib.colors import to_rgba

    styles = benchmark._styles()
    assert set(styles) == set(benchmark.COLUMNS)
    looks = {(to_rgba(s["color"]), s.get("hatch")) for s in styles.values()}
    assert len(looks) == len(benchmark.COLUMNS)
