"""How the stages before XLA scale with the number of variables (issue 15: linear in N).

For N variables of mixed small shapes on one device (momentum 0.9, Nesterov, weight decay,
EMA and, by default, global_clipnorm), times each stage separately: the stage-0 text
(`generate_text`), parsing and verifying it, each pass of the default pipeline on its own,
and the whole pipeline. Prints the median seconds per N and the exponent k of a
least-squares fit t ~ c * N^k over log t / log N (k ~ 1: linear; k ~ 2: quadratic).

    python bench/scale.py                          # N = 400, 1600, 6400; 3 runs each
    python bench/scale.py --sizes 400 1600 --runs 1 --clip clipnorm --json out.json

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
from sgdgen.codegen.pipeline import DEFAULT_PIPELINE, build_pass_manager, split_elements
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Mesh, VarSpec

#: Shapes cycled through to build N variables: vectors, matrices, a 3-d kernel and a scalar.
SHAPES: tuple[tuple[int, ...], ...] = ((16,), (8, 8), (32, 4), (4, 4, 4), (), (64,), (3, 5))


def variables(n: int, mesh: Mesh) -> list[VarSpec]:
    """N float32 variables of mixed small shapes, every third excluded from weight decay."""
    return [VarSpec.create(f"layer{i}/w", list(SHAPES[i % len(SHAPES)]), "float32", mesh, decay=i % 3 != 0)
            for i in range(n)]


def config(clip: str) -> SGDConfig:
    """The issue's configuration with the chosen clipping kind."""
    return SGDConfig.create(learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=0.004,
                            use_ema=True, ema_overwrite_frequency=10, **{clip: 1.0})


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(n: int, clip: str) -> dict[str, float]:
    """Seconds per stage for one run at N variables."""
    mesh = Mesh(())
    cfg, vs = config(clip), variables(n, mesh)
    row: dict[str, float] = {}
    row["generate_text"], text = _timed(lambda: generate_text(cfg, vs, mesh))
    ctx = make_context()
    row["parse"], module = _timed(lambda: parse_module(text, ctx))
    total = 0.0
    for element in split_elements(DEFAULT_PIPELINE.removeprefix("builtin.module(").removesuffix(")")):
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


def run(sizes: Sequence[int], runs: int, clip: str) -> dict[str, Any]:
    """Median seconds per stage and N, and the fitted exponent of each stage."""
    medians: dict[int, dict[str, float]] = {}
    for n in sizes:
        rows = [measure(n, clip) for _ in range(runs)]
        medians[n] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    stages = list(medians[sizes[0]])
    fit = {k: exponent(sizes, [medians[n][k] for n in sizes]) for k in stages}
    return {"clip": clip, "runs": runs, "sizes": list(sizes), "seconds": medians, "exponent": fit}


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
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    result = run(args.sizes, args.runs, args.clip)
    print(f"clip={args.clip}, median of {args.runs} run(s), 1 device")
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
