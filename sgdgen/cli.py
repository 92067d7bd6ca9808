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
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path}: not valid JSON: {e}") from e


def load_config(path: str) -> Any:
    """CONFIG.json: an optimizer `get_config()` dict (Keras keys)."""
    from sgdgen.config import SGDConfig

    data = _read_json(path, "config")
    if not isinstance(data, dict):
        raise UsageError(f"config {path}: expected a JSON object of optimizer arguments (Keras get_config keys)")
    try:
        return SGDConfig.from_config(data)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config {path}: {e}") from e


def load_mesh(text: str) -> Any:
    from sgdgen.spec import Mesh, SpecError

    try:
        return Mesh.parse(text)
    except SpecError as e:
        raise UsageError(f"--mesh {text!r}: {e}") from e


def load_vars(path: str, mesh: Any) -> list[Any]:
    """VARS.json: a list of {name, shape, dtype, layout?, decay?}."""
    from sgdgen.spec import SpecError, VarSpec

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
    from sgdgen.generate import GenerateError, generate_text

    config, mesh, variables = _step_inputs(args)
    try:
        text = generate_text(config, variables, mesh)
    except GenerateError as e:
        raise UsageError(str(e)) from e
    if args.lowered:
        from sgdgen.pipeline import DEFAULT_PIPELINE, run_pipeline

        text = run_pipeline(text, args.pass_pipeline or DEFAULT_PIPELINE)
    else:
        from sgdgen.ir import parse_module

        text = str(parse_module(text))
    sys.stdout.write(text)
    return 0


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
    p.set_defaults(func=cmd_emit)
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
