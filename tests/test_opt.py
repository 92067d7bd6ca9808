"""`sgdgen-opt` (sgdgen/tools/opt.py): positions of diagnostics, the input checks that keep
hostile files from crashing MLIR, and the big-stack worker. The crash cases themselves run
in subprocesses in tests/test_hostile.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sgdgen.tools import opt

BAD_OP = "%0 = stablehlo.no_such_op"


def sgdgen_opt(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sgdgen.tools.opt", *args], input=stdin, capture_output=True,
                          timeout=120)


def chunked_file(tmp_path: Path) -> tuple[Path, int, int]:
    """A file of four chunks whose third holds a bad op: (path, the op's line, its column)."""
    good = "module {\n  func.func @f(%a: tensor<f32>) -> tensor<f32> {\n    return %a : tensor<f32>\n  }\n}\n"
    bad = "module {\n  func.func @g() {\n    " + BAD_OP + "\n    return\n  }\n}\n"
    text = "\n// -----\n".join([good, good, "// a comment line\n" + bad, good])
    path = tmp_path / "chunks.mlir"
    path.write_text(text)
    lines = text.splitlines()
    line = next(i for i, t in enumerate(lines, 1) if BAD_OP in t)
    return path, line, lines[line - 1].index("%0") + len("%0 = ") + 1


def test_split_input_file_reports_the_file_s_line(tmp_path: Path) -> None:
    path, line, col = chunked_file(tmp_path)
    assert line > 10  # deep enough in the file that a chunk-relative line would differ
    r = sgdgen_opt([str(path), "--split-input-file"])
    assert r.returncode == 1
    err = r.stderr.decode()
    assert re.match(rf"^{re.escape(str(path))}:{line}:{col}: error: .*stablehlo.no_such_op", err), err
    assert r.stdout.decode().count("func.func @f") == 3  # the other chunks still print


def test_split_chunks_keep_every_position() -> None:
    """Each padded chunk has every character at the line and column it has in the file."""
    text = "a\nbc// -----  x\ny\n// -----\n\nzz// -----"
    pieces = text.split("// -----")
    start = 0
    for piece, chunk in zip(pieces, opt.split_chunks(text), strict=True):
        assert chunk.endswith(piece)
        pad = len(chunk) - len(piece)
        for k in range(len(piece)):
            assert opt.line_col(chunk, pad + k) == opt.line_col(text, start + k)
        start += len(piece) + len("// -----")


def test_line_col() -> None:
    text = "ab\ncde\n\nf"
    for offset in range(len(text)):
        before = text[:offset]
        assert opt.line_col(text, offset) == (before.count("\n") + 1, len(before.split("\n")[-1]) + 1)


@pytest.mark.parametrize("depth", [1, opt.MAX_NESTING])
def test_nesting_up_to_the_limit_passes(depth: int) -> None:
    assert opt.check_nesting("(" * depth + ")" * depth, "f") == ""


def test_nesting_past_the_limit_names_the_position() -> None:
    text = "x\n" + "{[(" * (opt.MAX_NESTING // 3 + 1)
    err = opt.check_nesting(text, "f.mlir")
    offset = 2 + opt.MAX_NESTING  # the (MAX_NESTING + 1)-th bracket
    line, col = opt.line_col(text, offset)
    assert err.startswith(f"f.mlir:{line}:{col}: error: brackets nest deeper than {opt.MAX_NESTING} levels")


def test_brackets_in_strings_and_comments_do_not_count() -> None:
    n = opt.MAX_NESTING + 1
    text = f'"{"[" * n}" // {"(" * n}\n' + '"esc\\"' + "{" * n + '"'
    assert opt.check_nesting(text, "f") == ""


def test_sequential_brackets_do_not_add_up() -> None:
    assert opt.check_nesting("[]" * (10 * opt.MAX_NESTING), "f") == ""


def test_utf8_problem_names_offset_line_and_column() -> None:
    data = "ok\nné\n".encode() + b"ab\xff"
    offset = data.index(b"\xff")
    assert opt.utf8_problem(data) == (f"byte 0xff at offset {offset} (line 3, column 3) is not UTF-8 "
                                      "(invalid start byte)")
    assert opt.utf8_problem("module {}".encode()) == ""


def test_work_runs_on_a_thread_with_the_big_stack() -> None:
    seen: list[str] = []
    assert opt.on_big_stack(lambda: seen.append(threading.current_thread().name) or 7) == 7
    assert seen == ["sgdgen-opt"]


def test_big_stack_reraises_on_the_caller() -> None:
    def fail() -> int:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        opt.on_big_stack(fail)
