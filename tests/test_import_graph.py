"""The package's import graph runs one way: each stage imports only earlier stages.

Stages, earliest first (DESIGN's pipeline): the base (errors, backend, the version), frontend,
codegen and the passes, runtime, io, api, integrations, tools. `sgdgen.reference` is the test
oracle: only tools (the demo) may import it, never the pipeline. Every `import` and
`from ... import` in every module is read from the source (also those inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["base", "frontend", "codegen", "runtime", "io", "api", "integrations", "tools"]
BASE = {"sgdgen.errors", "sgdgen.backend", "sgdgen.dtypes", "sgdgen.reference", "sgdgen._version"}


def stage_of(module: str) -> str | None:
    """The stage of a module of the package (None for the package root)."""
    if module in BASE:
        return "base"
    parts = module.split(".")
    if parts[:2] == ["sgdgen", "passes"]:
        return "codegen"
    if len(parts) >= 2 and parts[1] in STAGES:
        return parts[1]
    return None


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted((ROOT / "sgdgen").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join(parts), path))
    for path in sorted((ROOT / "passes").rglob("*.py")):
        rel = path.relative_to(ROOT / "passes").with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join(["sgdgen", "passes", *parts]), path))
    return out


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import of an sgdgen module in `path`."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("sgdgen")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("sgdgen"):
                continue
            for a in node.names:  # `from sgdgen.frontend import spec` imports the module sgdgen.frontend.spec
                candidate = f"{base}.{a.name}"
                found.append((candidate if stage_of(candidate) or (ROOT / candidate.replace(".", "/")).exists()
                              else base, node.lineno))
    return found


def test_every_module_has_a_stage() -> None:
    unplaced = [m for m, _ in modules() if stage_of(m) is None and m != "sgdgen"]
    assert not unplaced, f"modules outside every stage: {unplaced}; put each in a stage package"


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_run_from_later_stages_to_earlier(module: str, path: Path) -> None:
    if module == "sgdgen":
        return  # the package root re-exports the public API
    here = STAGES.index(stage_of(module))
    bad = []
    for target, line in imports(path, module):
        if target == "sgdgen.reference" and stage_of(module) != "tools" and module != "sgdgen.reference":
            bad.append(f"line {line}: {target} (the test oracle; the pipeline must not depend on it)")
            continue
        there = stage_of(target)
        if there is None and stage_of(module) == "tools":
            continue  # the last stage may use the public API through the package root
        if there is None:
            bad.append(f"line {line}: {target} (the package root: import the module that defines the name)")
        elif STAGES.index(there) > here:
            bad.append(f"line {line}: {target} (stage {there} comes after {stage_of(module)})")
    assert not bad, f"{module} imports against the pipeline's direction:\n  " + "\n  ".join(bad)
