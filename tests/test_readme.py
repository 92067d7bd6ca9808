"""README.md against the code, so the front page cannot drift: its "Ten lines" example runs as
written (on the 8 simulated devices of tests/conftest.py), its relative links resolve in the
repository, and its command-line table names every flag that `sgdgen <cmd> --help` offers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MARKER = "<!-- readme-example: ten-lines"


def ten_lines() -> str:
    """The ```python block right after the marker comment."""
    start = README.index(MARKER)
    m = re.compile(r"```python\n(.*?)```", re.S).search(README, start)
    assert m and README[start:m.start()].count("\n") <= 1, "the marker must sit right above the python block"
    return m.group(1)


def test_ten_lines_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sgdgen
    from sgdgen.io import artifact

    monkeypatch.chdir(tmp_path)  # it writes step.sgd in the working directory
    code = ten_lines()
    assert 8 <= len([ln for ln in code.splitlines() if ln.strip()]) <= 14, "the example should stay short"
    scope: dict = {}
    exec(compile(code, "README.md:ten-lines", "exec"), scope)
    opt, w, b = scope["opt"], scope["w"], scope["b"]
    assert isinstance(opt, sgdgen.SGD) and int(opt.iterations.numpy()) == 2  # apply_gradients + minimize
    assert w.layout.sharding_specs == ["unsharded", "model"] and opt.mesh.size == 8
    assert not np.array_equal(w.numpy(), np.ones((8, 16), np.float32))
    assert artifact.read(tmp_path / "step.sgd").program.mesh == scope["mesh"]


def test_relative_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [ln for ln in links if "://" not in ln]
    assert "docs/numerics.md" in local
    missing = [ln for ln in local if not (ROOT / ln).exists()]
    assert not missing, f"README links to files a clone lacks: {missing}"
    assert "../" not in " ".join(local)


def _flags(parser) -> set[str]:
    return {opt for a in parser._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"}


def test_cli_table_names_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from sgdgen.tools import opt
    from sgdgen.tools.cli import build_parser

    with pytest.raises(SystemExit):
        opt.main(["--help"])
    opt_flags = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help"}

    section = README[README.index("## The command line"):README.index("## The artifact")]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = []
    for name, p in sub.choices.items():
        rows = [ln for ln in section.splitlines() if ln.startswith(f"| `sgdgen {name}")]
        assert rows, f"README's command table has no row for `sgdgen {name}`"
        missing += [f"sgdgen {name} {f}" for f in sorted(_flags(p)) if f not in rows[0]]
    opt_row = next(ln for ln in section.splitlines() if ln.startswith("| `sgdgen-opt"))
    assert "--pass-pipeline" in opt_flags
    missing += [f"sgdgen-opt {f}" for f in sorted(opt_flags) if f not in opt_row]
    assert not missing, f"README's command table omits {missing}"


# ---- what CI says it tested ------------------------------------------------------------------


def _requirements(*extras: str) -> list[str]:
    """The dependencies and the `extras` (default: the test extra, what CI installs)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + [r for e in (extras or ("test",)) for r in project["optional-dependencies"][e]]


def test_every_optional_dependency_has_an_upper_bound() -> None:
    import tomllib

    from packaging.requirements import Requirement

    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for text in (r for group in groups.values() for r in group):
        assert any(s.operator in ("<", "<=", "==", "~=") for s in Requirement(text).specifier), f"{text}: no upper bound"


def test_every_dependency_has_a_tested_upper_bound_and_this_environment_is_inside() -> None:
    """A range without an upper bound resolves to releases nobody tested (issue 8: ml_dtypes 0.7)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    for text in _requirements():
        req = Requirement(text)
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{text}: no upper bound"
        assert req.specifier.contains(md.version(req.name)), f"{req.name} {md.version(req.name)} is outside {text}"


def test_ci_prints_the_resolved_versions_and_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """.ci/run's version/CPU report (the python heredoc) names every dependency with its version."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    script = (ROOT / ".ci" / "run").read_text()
    body = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)
    assert body, ".ci/run lost its version report"
    assert script.index("<<'PY'") < script.index('"$venv/bin/pytest"'), "the report must come before the tests"
    exec(compile(body.group(1), ".ci/run", "exec"), {})
    out = capsys.readouterr().out
    for text in _requirements():
        name = Requirement(text).name
        assert f"{name}={md.version(name)}" in out, f"{name} missing from: {out}"
    assert re.search(r"^cpu: .+ \| flags: ", out, re.M), out
