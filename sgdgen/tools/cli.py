"""`sgdgen` command line: emit | compile | inspect | demo | bench.

In the style of the XLA / MLIR tools: IR on stdout, diagnostics on stderr, exit
status 2 for bad input (a file, a field, a mesh) and 1 for a failed check.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad input from the command line or its files; printed without a traceback."""


def _read_json(path: str, what: str) -> Any:
    """The JSON value in file `path` (or stdin for "-"); any unreadable, non-UTF-8, invalid or
    too deeply nested input is a UsageError naming the file."""
    from sgdgen.tools.opt import utf8_problem

    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from e
    bad = utf8_problem(data)
    if bad:
        raise UsageError(f"{what} {path}: {bad}; a JSON file must be UTF-8 text")
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path}: not valid JSON: {e}") from e
    except RecursionError as e:  # Python's JSON reader recurses once per nested array or object
        raise UsageError(f"{what} {path}: JSON nested too deeply to read (the files sgdgen reads nest a few "
                         "levels)") from e


def load_config(path: str) -> Any:
    """CONFIG.json: an optimizer `get_config()` dict (Keras keys)."""
    from sgdgen.frontend.config import SGDConfig

    data = _read_json(path, "config")
    if not isinstance(data, dict):
        raise UsageError(f"config {path}: expected a JSON object of optimizer arguments (Keras get_config keys)")
    try:
        return SGDConfig.from_config(data)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config {path}: {e}") from e


def load_mesh(text: str) -> Any:
    from sgdgen.frontend.spec import Mesh, SpecError

    try:
        return Mesh.parse(text)
    except SpecError as e:
        raise UsageError(f"--mesh {text!r}: {e}") from e


def load_vars(path: str, mesh: Any) -> list[Any]:
    """VARS.json: a list of {name, shape, dtype, layout?, decay?}."""
    from sgdgen.frontend.spec import SpecError, VarSpec

    data = _read_json(path, "vars")
    if not isinstance(data, list) or not data:
        raise UsageError(f"vars {path}: expected a non-empty JSON list of variables "
                         '({"name": ..., "shape": [...], "dtype": "float32", "layout": [...]})')
    out = []
    for k, entry in enumerate(data):
        try:
            out.append(VarSpec.from_json(entry, mesh, where=f"vars[{k}]"))
        except SpecError as e:
            raise UsageError(f"vars {path}: {e}") from e
    return out


def _step_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    config = load_config(args.config)
    mesh = load_mesh(args.mesh)
    return config, mesh, load_vars(args.vars, mesh)


def cmd_emit(args: argparse.Namespace) -> int:
    from sgdgen.codegen.abi import unreduced_for
    from sgdgen.codegen.generate import GenerateError, generate_text

    config, mesh, variables = _step_inputs(args)
    if args.buckets is not None:
        from sgdgen.frontend import buckets

        if args.buckets < 1:
            raise UsageError(f"--buckets: the threshold is a positive number of elements, got {args.buckets}")
        plan = buckets.plan(variables, mesh, threshold=args.buckets, per_variable_norms=config.clipnorm is not None)
        variables = list(plan.buckets)
        sys.stderr.write(f"sgdgen emit: {plan.describe()}\n")
    elif args.gradient_segments:
        raise UsageError("--gradient-segments needs --buckets: only a flat bucket's gradient arrives in segments")
    axes = [a for a in args.unreduced_gradients.split(",") if a]
    segments = plan.gradient_segments() if args.gradient_segments else ()
    try:
        text = generate_text(config, variables, mesh, unreduced_for(variables, axes) if axes else (), segments)
    except GenerateError as e:
        raise UsageError(str(e)) from e
    if args.lowered:
        from jaxlib.mlir import ir

        from sgdgen.codegen.pipeline import DEFAULT_PIPELINE, PipelineError, run_pipeline

        try:
            text = run_pipeline(text, args.pass_pipeline or DEFAULT_PIPELINE)
        except PipelineError as e:
            raise UsageError(f"--pass-pipeline: {e}") from e
        except ir.MLIRError as e:
            from sgdgen.tools.opt import format_diagnostics

            raise UsageError("the pass pipeline failed:\n" + format_diagnostics(e, "<stage 0>").rstrip()) from e
    else:
        from sgdgen.codegen.ir import parse_module

        text = str(parse_module(text))
    sys.stdout.write(text)
    return 0


def _load_program(args: argparse.Namespace) -> Any:
    from sgdgen.codegen.generate import GenerateError
    from sgdgen.runtime.program import StepProgram

    config, mesh, variables = _step_inputs(args)
    program = StepProgram(config, tuple(variables), mesh)
    try:
        program.stage0_text
    except GenerateError as e:
        raise UsageError(str(e)) from e
    return program


def cmd_compile(args: argparse.Namespace) -> int:
    from sgdgen.io import artifact

    program = _load_program(args)
    _ensure_devices(program.mesh.size)
    out = Path(args.output)
    platforms = None if args.platforms is None else [p for p in args.platforms.split(",") if p.strip()]
    try:
        artifact.write(program, out, platforms=platforms)
    except artifact.ArtifactError as e:  # a target it must not replace (a file, a symlink, not an artifact)
        raise UsageError(f"-o {out}: {e}") from e
    except RuntimeError as e:  # e.g. the mesh needs more devices than this process has
        raise UsageError(str(e)) from e
    except OSError as e:
        raise UsageError(f"-o {out}: {e.strerror or e}") from e
    print(f"wrote {out} ({len(program.variables)} variables, mesh {str(program.mesh) or '(one device)'})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sgdgen.io import artifact

    try:
        art = artifact.read(args.artifact)
    except artifact.ArtifactError as e:
        print(f"sgdgen inspect: {e}", file=sys.stderr)
        return 1
    info = artifact.summary(art)
    if args.check_fresh:
        diff = artifact.check_fresh(art)
        info["fresh"] = diff is None
        if diff is not None:
            info["fresh_diff"] = diff
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sgdgen artifact {info['path']}", show_header=False)
    for key in ("format_version", "calling_convention_version", "sgdgen_version", "stablehlo_target_version", "mesh",
                "variables", "parameters", "state_bytes", "all_reduce", "manual_computation", "aliased_buffers"):
        table.add_row(key, str(info[key]))
    for platform, fp in info["executables"].items():
        table.add_row(f"executable ({platform})", f"jaxlib {fp['jaxlib']}, {fp['platform_version']}")
    if args.check_fresh:
        table.add_row("fresh", "yes: today's sgdgen emits the same step.mlir" if info["fresh"]
                      else "no: today's sgdgen emits another step.mlir (the artifact still loads; diff below)")
    console = Console()
    console.print(table)
    vt = Table(title="variables")
    for col in ("name", "shape", "dtype", "layout", "decay"):
        vt.add_column(col)
    for v in info["variable_table"]:
        vt.add_row(v["name"], str(v["shape"]), v["dtype"], str(v["layout"]), str(v["decay"]))
    console.print(vt)
    if info.get("fresh_diff"):
        console.print(info["fresh_diff"], markup=False, highlight=False)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _ensure_devices(8)
    from rich.console import Console

    console = Console()
    if args.keras:
        from sgdgen.tools.keras_demo import run_keras_demo

        k = run_keras_demo(epochs=args.epochs or 3, console=console)
        console.print(f"[bold]{k.epochs} epochs twice in {k.seconds:.1f} s[/]")
        console.print(k.verdict(), style="bold green" if k.passed else "bold red", soft_wrap=True)
        return 0 if k.passed else 1
    from sgdgen.tools.demo import run_demo

    r = run_demo(epochs=args.epochs or 8, progress=not args.no_progress, console=console)
    console.print(f"[bold]{r.steps} steps in {r.seconds:.1f} s[/] (compile {r.compile_seconds:.2f} s); loss "
                  f"{r.losses[0]:.4f} -> {r.losses[-1]:.4f}")
    console.print(f"largest difference from sgdgen.reference fed the same gradients: {r.max_abs_diff:.3g} "
                  f"(relative to the largest weight: {r.max_rel_diff:.3g})")
    console.print(r.verdict(), style="bold green" if r.passed else "bold red", soft_wrap=True)
    return 0 if r.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs sgdgen.tools.benchmark; the table goes to stdout, or to stderr when the JSON does."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from rich.console import Console

    from sgdgen.tools import benchmark

    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout, width=220)
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    result = benchmark.run(quick=args.quick, rounds=args.rounds, per_round=args.steps, only=only,
                           log=lambda s: console.print(f"[dim]{s}[/dim]"))
    if args.markdown:
        console.print(benchmark.markdown(result), markup=False, highlight=False)
    else:
        console.print(benchmark.table(result))
    for note in benchmark.notes(result):
        console.print(note)
    if args.plot:
        benchmark.plot(result, args.plot)
    text = json.dumps(result, indent=1)
    if to_stdout:
        print(text)
    elif args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _ensure_devices(n: int) -> None:
    """On CPU, simulate `n` devices; must run before jax starts its CPU client."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # XLA's start-up INFO lines are noise here
    flag = f"--xla_force_host_platform_device_count={n}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def _add_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="CONFIG.json: an optimizer get_config() dict (Keras keys)")
    p.add_argument("--mesh", default="", help='device mesh, e.g. "batch=2,model=4" (default: one device)')
    p.add_argument("--vars", required=True, help="VARS.json: [{name, shape, dtype, layout?, decay?}, ...]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgdgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("emit", help="print the stage-0 module (or, with --lowered, the partitioned step)")
    _add_step_args(p)
    p.add_argument("--lowered", action="store_true", help="run the default pass pipeline (stage 1)")
    p.add_argument("--pass-pipeline", default=None, help="with --lowered: a pipeline instead of the default")
    p.add_argument("--buckets", type=int, nargs="?", const=1 << 16, default=None, metavar="THRESHOLD",
                   help="the step over flat buckets: replicated variables of fewer than THRESHOLD elements "
                        "(default 65536) packed per (dtype, weight decay) group (sgdgen.frontend.buckets)")
    p.add_argument("--gradient-segments", action="store_true",
                   help="with --buckets: each flat bucket's gradient arrives as its members' gradients (one "
                        "argument each, concatenated in the program), as sgdgen.SGD(buckets=True) feeds it on CPU")
    p.add_argument("--unreduced-gradients", default="", metavar="AXES",
                   help="comma-separated mesh axes over which the gradients of variables replicated on them "
                        'arrive unreduced (partial sums, e.g. "batch"); the step sums them')
    p.set_defaults(func=cmd_emit)
    p = sub.add_parser("compile", help="write an artifact directory (step.mlir, step.mlirbc, manifest, executable)")
    _add_step_args(p)
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--platforms", default=None,
                   help="comma-separated platforms step.jaxexport is lowered for, e.g. cpu,cuda,tpu "
                        "(default: this machine's; an empty string: no jax.export module)")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("inspect", help="verify an artifact and summarise it (exit 1 if it does not verify)")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--check-fresh", action="store_true",
                   help="also report whether today's sgdgen generates the same step.mlir (a report; loading "
                        "never regenerates)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="train a small MLP on the devices found (8 simulated CPU devices unless "
                                    "XLA_FLAGS says otherwise) and check against the reference",
                       description="Train a small MLP (16 steps per epoch, every optimizer option on) on a "
                                   "batch x model mesh that fits the devices (8: 2x4, 4: 2x2, 2: 1x2, 1: 1x1), "
                                   "compare the compiled optimizer with sgdgen.reference fed the same gradients, "
                                   "and end with a PASS/FAIL line (exit status 1 on FAIL).")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="epochs to train, 16 steps each (default: 8; with --keras: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch loss is still printed)")
    p.add_argument("--keras", action="store_true",
                   help="instead: train a small Keras 3 model with sgdgen.keras.SGD and with keras.optimizers.SGD "
                        "and compare them (PASS/FAIL, exit 1 on FAIL)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="time the step against optax, Keras 3, torch and the memory bound")
    p.add_argument("--quick", action="store_true", help="CI-sized models and rounds (under a minute)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; 3 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per contender per round (default 5; 2 with --quick)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the results as JSON to FILE (stdout when FILE is omitted; the table then goes to stderr)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (as in README.md)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated parts to run: model names, 'program', 'cold' (default: all)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a bar plot (x bound per model) to this file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sgdgen` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"sgdgen {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
