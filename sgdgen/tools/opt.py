"""`sgdgen-opt`: run a pass pipeline over a .mlir file, like mlir-opt.

    sgdgen-opt [FILE|-] --pass-pipeline='builtin.module(sgd-fuse-step,canonicalize)'

Prints the module on stdout. Bad IR, an unknown pass, or a pass failure prints
MLIR diagnostics (`FILE:LINE:COL: error: ...`) on stderr and exits 1; never a traceback.
`--split-input-file` runs each `// -----` chunk on its own, as mlir-opt does, with
diagnostics at the file's lines.

Hostile input gets a diagnostic too: bytes that are not UTF-8 are reported at their
offset, and brackets nested deeper than `MAX_NESTING` are refused before parsing
(MLIR's parser, printer and verifier recurse once per level and overflow the stack:
measured on jaxlib 0.10.2 with an 8 MiB stack, 4,000 nested modules or 10,000 nested
array attributes crash with SIGSEGV; 3,000 and 5,000 do not). The work runs on a
thread with a `STACK_BYTES` stack, so the bound holds whatever the process's stack
limit is.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from collections.abc import Callable, Sequence

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


#: The deepest nesting of (), [] and {} accepted: a 3.5x margin below the depth that crashes
#: with an 8 MiB stack (see the module docstring), and far above any real module (sgdgen's
#: own nest fewer than 20 levels).
MAX_NESTING = 1000
#: The stack of the thread that parses, runs passes and prints: 8x the common 8 MiB default.
STACK_BYTES = 64 << 20
#: A string literal (to skip; MLIR strings end at the line), a `//` comment, or a bracket.
_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"?|//[^\n]*|[\[\]{}()]')


def line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of character `offset` of `text`."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def check_nesting(text: str, filename: str, limit: int = MAX_NESTING) -> str:
    """A diagnostic if brackets in `text` (outside strings and comments) nest deeper than `limit`,
    else ""; the position is the first bracket beyond the limit."""
    depth = 0
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok in "([{":
            depth += 1
            if depth > limit:
                line, col = line_col(text, m.start())
                return (f"{filename}:{line}:{col}: error: brackets nest deeper than {limit} levels; sgdgen-opt "
                        "refuses such input because MLIR's parser recurses once per level and would overflow "
                        "the stack\n")
        elif tok in ")]}":
            depth = max(depth - 1, 0)
    return ""


def utf8_problem(data: bytes) -> str:
    """"" if `data` is UTF-8, else where it is not: the first bad byte, its offset, line and column."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8")
        line, col = line_col(before, len(before))  # the column counts characters, as MLIR's do
        return f"byte 0x{data[e.start]:02x} at offset {e.start} (line {line}, column {col}) is not UTF-8 ({e.reason})"
    return ""


def run_one(text: str, pipeline: str | None, filename: str) -> tuple[str, str]:
    """Returns (stdout, stderr) for one input chunk; stderr non-empty means failure."""
    from sgdgen.codegen.ir import make_context
    from sgdgen.codegen.pipeline import PipelineError, build_pass_manager

    too_deep = check_nesting(text, filename)
    if too_deep:
        return "", too_deep
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
        if args.input == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.input, "rb") as f:
                data = f.read()
    except OSError as e:
        print(f"sgdgen-opt: cannot read {filename}: {e.strerror}", file=sys.stderr)
        return 1
    bad = utf8_problem(data)
    if bad:
        print(f"{filename}: error: {bad}; sgdgen-opt reads MLIR assembly text, not bytecode or binary files",
              file=sys.stderr)
        return 1
    text = data.decode("utf-8")
    return on_big_stack(lambda: process(text, args.pass_pipeline, filename, args.split_input_file))


def split_chunks(text: str) -> list[str]:
    """The `// -----` chunks of `text`, each padded with the newlines and spaces that put its first
    character at its line and column in `text`, so diagnostics give the file's positions."""
    chunks = []
    start = 0
    for piece in text.split("// -----"):
        line, col = line_col(text, start)
        chunks.append("\n" * (line - 1) + " " * (col - 1) + piece)
        start += len(piece) + len("// -----")
    return chunks


def process(text: str, pipeline: str | None, filename: str, split: bool) -> int:
    """Runs every chunk, writes the modules to stdout and diagnostics to stderr; the exit status."""
    status = 0
    outputs = []
    for chunk in split_chunks(text) if split else [text]:
        out, err = run_one(chunk, pipeline, filename)
        if err:
            sys.stderr.write(err)
            status = 1
        else:
            outputs.append(out)
    sys.stdout.write("\n// -----\n".join(outputs))
    return status


def on_big_stack(work: Callable[[], int]) -> int:
    """`work()` on a thread with a `STACK_BYTES` stack (MLIR recurses per nesting level); its
    result, or its exception re-raised here."""
    result: list[int] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(work())
        except BaseException as e:  # re-raised on the caller's thread
            error.append(e)

    previous = threading.stack_size(STACK_BYTES)
    try:
        thread = threading.Thread(target=target, name="sgdgen-opt")
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    if error:
        raise error[0]
    return result[0]

if __name__ == "__main__":
    sys.exit(main())
