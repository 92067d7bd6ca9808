"""`sgdgen-opt`: run a pass pipeline over a .mlir file, like mlir-opt.

    sgdgen-opt [FILE|-] --pass-pipeline='builtin.module(sgd-fuse-step,canonicalize)'

Prints the module on stdout. Bad IR, an unknown pass, or a pass failure prints
MLIR diagnostics (`FILE:LINE:COL: error: ...`) on stderr and exits 1; never a traceback.
`--split-input-file` runs each `// -----` chunk on its own, as mlir-opt does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxlib.mlir import ir


def format_diagnostics(err: ir.MLIRError, filename: str) -> str:
    """MLIR-style lines for each error diagnostic (and its notes)."""
    lines = []

    def fmt(d: object, kind: str) -> None:
        loc = str(d.location)  # type: ignore[attr-defined]
        where = loc
        if loc.startswith("loc(") and loc.endswith(")"):
            where = loc[4:-1].replace('"-"', filename).replace('"', "")
        lines.append(f"{where}: {kind}: {d.message}")  # type: ignore[attr-defined]
        for n in getattr(d, "notes", []):
            fmt(n, "note")

    details = getattr(err, "error_diagnostics", [])
    for d in details:
        fmt(d, "error")
    if not details:
        lines.append(f"{filename}: error: {err}")
    return "\n".join(lines) + "\n"


def run_one(text: str, pipeline: str | None, filename: str) -> tuple[str, str]:
    """Returns (stdout, stderr) for one input chunk; stderr non-empty means failure."""
    from sgdgen.codegen.ir import make_context
    from sgdgen.codegen.pipeline import PipelineError, build_pass_manager

    ctx = make_context()
    with ctx:
        try:
            module = ir.Module.parse(text)
        except ir.MLIRError as e:
            return "", format_diagnostics(e, filename)
        if pipeline:
            try:
                pm = build_pass_manager(pipeline, ctx)
            except PipelineError as e:
                return "", f"sgdgen-opt: error: {e}\n"
            try:
                pm.run(module.operation)
            except ir.MLIRError as e:
                return "", format_diagnostics(e, filename)
        try:
            module.operation.verify()
        except ir.MLIRError as e:
            return "", format_diagnostics(e, filename)
        return str(module), ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sgdgen-opt` console script."""
    parser = argparse.ArgumentParser(prog="sgdgen-opt", description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", default="-", help="input .mlir file, or - for stdin")
    parser.add_argument("--pass-pipeline", default=None, help="e.g. builtin.module(sgd-fuse-step,canonicalize)")
    parser.add_argument("--split-input-file", action="store_true", help="treat '// -----' as separate inputs")
    parser.add_argument("--list-passes", action="store_true", help="list sgdgen's passes and exit")
    args = parser.parse_args(argv)
    if args.list_passes:
        from sgdgen.passes import PASSES

        for info in PASSES.values():
            print(f"{info.name}: {info.summary}")
        return 0
    filename = "<stdin>" if args.input == "-" else args.input
    try:
        text = sys.stdin.read() if args.input == "-" else open(args.input).read()
    except OSError as e:
        print(f"sgdgen-opt: cannot read {filename}: {e.strerror}", file=sys.stderr)
        return 1
    chunks = text.split("// -----") if args.split_input_file else [text]
    status = 0
    outputs = []
    for chunk in chunks:
        out, err = run_one(chunk, args.pass_pipeline, filename)
        if err:
            sys.stderr.write(err)
            status = 1
        else:
            outputs.append(out)
    sys.stdout.write("\n// -----\n".join(outputs))
    return status


if __name__ == "__main__":
    sys.exit(main())
