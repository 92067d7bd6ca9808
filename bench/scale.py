"""How the stages before XLA scale with the number of variables (issue 15: linear in N).

For N variables of mixed small shapes (momentum 0.9, Nesterov, weight decay, EMA and, by
default, global_clipnorm), on one device or on a 2x4 mesh (every fourth variable sharded over
"model", the rest replicated), times each stage separately: the stage-0 text
(`generate_text`), parsing and verifying it, each pass of the default pipeline on its own,
and the whole pipeline. Prints the fastest of the runs per N and the exponent k of a
least-squares fit t ~ c * N^k over log t / log N (k ~ 1: linear; k ~ 2: quadratic).

Times are CPU seconds of this process (`time.process_time`; the stages are single-threaded)
and the minimum over the runs: on a shared machine wall time and medians move by 30-50%
between runs, which swings a fitted exponent by +-0.3, while the fastest CPU time of each
size is what the code itself costs.

    python bench/scale.py                          # N = 400, 1600, 6400; 3 runs each; 1 device
    python bench/scale.py --devices 8 --sizes 400 1600 --runs 1 --clip clipnorm --json out.json

XLA's own compile is not timed here (see PERF-NOTES.md); this is what sgdgen controls.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from sgdgen.codegen.generate import generate_text
from sgdgen.codegen.ir import make_context, parse_module
from sgdgen.codegen.pipeline import build_pass_manager, pipeline_for, split_elements
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Mesh, VarSpec

#: Shapes cycled through to build N variables: vectors, matrices, a 3-d kernel and a scalar.
SHAPES: tuple[tuple[int, ...], ...] = ((16,), (8, 8), (32, 4), (4, 4, 4), (), (64,), (3, 5))


#: The mesh of each device count: one device, or 2 (data) x 4 (model).
MESHES: dict[int, str] = {1: "", 8: "batch=2,model=4"}


def mesh_for(devices: int) -> Mesh:
    """The benchmark's mesh for `devices` (1 or 8)."""
    return Mesh(MESHES[devices] or ())


def variables(n: int, mesh: Mesh) -> list[VarSpec]:
    """N float32 variables of mixed small shapes, every third excluded from weight decay; on a
    mesh with a "model" axis every fourth variable whose first dimension divides by it is
    sharded over it on that dimension, the others replicated."""
    model = mesh.axis_size("model") if "model" in mesh.axis_names else 0
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        sharded = model and i % 4 == 0 and shape and shape[0] % model == 0
        layout = ["model", *[None] * (len(shape) - 1)] if sharded else None
        out.append(VarSpec.create(f"layer{i}/w", list(shape), "float32", mesh, layout, decay=i % 3 != 0))
    return out


def config(clip: str) -> SGDConfig:
    """The issue's configuration with the chosen clipping kind."""
    return SGDConfig.create(learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=0.004,
                            use_ema=True, ema_overwrite_frequency=10, **{clip: 1.0})


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds of this process spent in `fn`, and its result."""
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def measure(n: int, clip: str, devices: int = 1, shard_update_over: str | None = None) -> dict[str, float]:
    """CPU seconds per stage for one run at N variables (`shard_update_over`: the pipeline with
    weight-update sharding over that axis)."""
    mesh = mesh_for(devices)
    cfg, vs = config(clip), variables(n, mesh)
    row: dict[str, float] = {}
    row["generate_text"], text = _timed(lambda: generate_text(cfg, vs, mesh))
    ctx = make_context()
    row["parse"], module = _timed(lambda: parse_module(text, ctx))
    total = 0.0
    for element in split_elements(pipeline_for(shard_update_over).removeprefix("builtin.module(").removesuffix(")")):
        pm = build_pass_manager(f"builtin.module({element})", ctx)
        with ctx:
            row[element], _ = _timed(lambda: pm.run(module.operation))
        total += row[element]
    row["pipeline"] = total
    row["before_xla"] = row["generate_text"] + row["parse"] + total
    return row


def exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """Least-squares slope of log(seconds) against log(N)."""
    xs, ys = [math.log(n) for n in sizes], [math.log(max(s, 1e-9)) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(sizes: Sequence[int], runs: int, clip: str, devices: int = 1,
        shard_update_over: str | None = None) -> dict[str, Any]:
    """Fastest CPU seconds per stage and N over `runs`, and the fitted exponent of each stage."""
    measure(min(sizes), clip, devices, shard_update_over)  # templates, dialects, code paths warm before timing
    best: dict[int, dict[str, float]] = {}
    for n in sizes:
        rows = [measure(n, clip, devices, shard_update_over) for _ in range(runs)]
        best[n] = {k: min(r[k] for r in rows) for k in rows[0]}
    stages = list(best[sizes[0]])
    fit = {k: exponent(sizes, [best[n][k] for n in sizes]) for k in stages}
    return {"clip": clip, "runs": runs, "devices": devices, "shard_update_over": shard_update_over,
            "sizes": list(sizes), "seconds": best, "exponent": fit}


def table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per stage, one column per N, and the exponent."""
    sizes = result["sizes"]
    head = "| stage | " + " | ".join(f"N={n}" for n in sizes) + " | exponent k |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for stage, k in result["exponent"].items():
        cells = " | ".join(f"{result['seconds'][n][stage]:.3f} s" for n in sizes)
        lines.append(f"| {stage} | {cells} | {k:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[400, 1600, 6400])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--clip", choices=["global_clipnorm", "clipnorm", "clipvalue"], default="global_clipnorm")
    p.add_argument("--devices", type=int, choices=sorted(MESHES), default=1)
    p.add_argument("--shard-update-over", help='weight-update sharding over this axis (8 devices: "batch")')
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    result = run(args.sizes, args.runs, args.clip, args.devices, args.shard_update_over)
    print(f"clip={args.clip}, fastest CPU time of {args.runs} run(s), {args.devices} device(s)"
          + (f", weight update sharded over {args.shard_update_over}" if args.shard_update_over else ""))
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
