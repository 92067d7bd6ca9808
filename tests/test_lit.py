"""Runs the lit + FileCheck suite (lit_tests/: emitted stage-0 IR, single passes).

The whole directory runs, so tests added under lit_tests/ (passes/ included) are picked
up without touching this file. The tools come from the active environment: the directory
of this interpreter is put first on PATH, as lit_tests/lit.cfg.py expects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIT_TESTS = ROOT / "lit_tests"
ENV_BIN = Path(sys.executable).parent


def _lit_command() -> list[str]:
    """`lit` of this environment (lit has no `python -m lit` entry point)."""
    exe = shutil.which("lit", path=str(ENV_BIN))
    if exe is not None:
        return [exe]
    pytest.importorskip("lit", reason="lit is a test extra: pip install -e '.[test]'")
    return [sys.executable, "-c", "import sys, lit.main; sys.argv[0] = 'lit'; lit.main.main()"]


def _count(summary: str, label: str) -> int:
    """The count of one result kind in lit's summary ("  Passed: 12 (92.31%)")."""
    m = re.search(rf"^\s*{label}\s*:\s*(\d+)", summary, re.MULTILINE)
    return int(m.group(1)) if m else 0


def test_lit_suite() -> None:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(ENV_BIN), env.get("PATH", "")])
    proc = subprocess.run(
        [*_lit_command(), "-v", str(LIT_TESTS)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )
    output = proc.stdout
    passed = _count(output, "Passed")
    assert proc.returncode == 0, f"lit exited with {proc.returncode}:\n{output}"
    assert passed > 0, f"lit ran no passing tests:\n{output}"
