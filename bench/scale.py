"""How the stages before XLA scale with the number of variables (issue 15: linear in N).

For N float32 variables of mixed shapes (`sgdgen.tools.benchmark.scale_specs`; momentum 0.9,
Nesterov, weight decay, EMA and, by default, global_clipnorm), on one device or on a 2x4 mesh
(every fourth variable sharded over "model", the rest replicated), optionally with the weight
update sharded over "batch", times each stage separately (`benchmark.stage_seconds`): the
stage-0 text, parsing and verifying it, and each pass of the pipeline on its own. Prints the
fastest run per N and the exponent k of a least-squares fit t ~ c * N^k (k ~ 1: linear;
k ~ 2: quadratic). `sgdgen bench` runs the same measurement in its scale section.

Times are CPU seconds of this process and the minimum over the runs: on a shared machine wall
time and medians move by 30-50% between runs, which swings a fitted exponent by +-0.3, while
the fastest CPU time of each size is what the code itself costs. MLIR's own C++ passes
(canonicalize, cse, symbol-dce) are the yardstick: linear code, whose fitted k shows what
memory (caches) adds between N=400 and 6,400 on this machine.

    python bench/scale.py                          # N = 400, 1600, 6400; 3 runs each; 1 device
    python bench/scale.py --devices 8 --shard-update-over batch --sizes 400 1600 --runs 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from sgdgen.codegen.pipeline import pipeline_for
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Mesh
from sgdgen.tools.benchmark import SCALE_MESHES, fit_exponent, scale_specs, stage_seconds


def config(clip: str) -> SGDConfig:
    """The issue's configuration with the chosen clipping kind."""
    return SGDConfig.create(learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=0.004,
                            use_ema=True, ema_overwrite_frequency=10, **{clip: 1.0})


def run(sizes: Sequence[int], runs: int, clip: str, devices: int = 1,
        shard_update_over: str | None = None) -> dict[str, Any]:
    """Fastest CPU seconds per stage and N over `runs`, and the fitted exponent of each stage."""
    cfg, mesh, pipeline = config(clip), Mesh(SCALE_MESHES[devices] or ()), pipeline_for(shard_update_over)
    stage_seconds(cfg, scale_specs(min(sizes), mesh), mesh, pipeline)  # warm before anything is timed
    best: dict[int, dict[str, float]] = {}
    for n in sizes:
        rows = [stage_seconds(cfg, scale_specs(n, mesh), mesh, pipeline) for _ in range(runs)]
        best[n] = {k: min(r[k] for r in rows) for k in rows[0]}
    fit = {k: fit_exponent(sizes, [best[n][k] for n in sizes]) for k in best[sizes[0]]}
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
    p.add_argument("--devices", type=int, choices=sorted(SCALE_MESHES), default=1)
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
