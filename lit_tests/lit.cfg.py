# -*- Python -*-
"""lit configuration of the sgdgen FileCheck suite.

Runs `.mlir` and `.test` files under lit_tests/ (emit/: the stage-0 module printed
by `sgdgen emit`; passes/: `sgdgen-opt` runs of single passes). RUN lines use the
tools by their plain names -- `sgdgen`, `sgdgen-opt`, `filecheck`, and lit's builtin
`not` -- resolved in the ACTIVE Python environment: the directory of the interpreter
running lit comes first on PATH, so `/path/to/venv/bin/lit lit_tests` tests that
venv's install. `%sgdgen`, `%sgdgen-opt`, `%filecheck` (absolute paths) and
`%python` (this interpreter) are substitutions for RUN lines that want to be explicit.

    /path/to/venv/bin/lit -v lit_tests      # or: pytest tests/test_lit.py
"""

import os
import shutil
import sys

import lit.formats

config.name = "sgdgen"
config.test_format = lit.formats.ShTest(execute_external=False)
config.suffixes = [".mlir", ".test"]  # JSON inputs live in Inputs/ and are never tests
config.excludes = ["Inputs", "lit.cfg.py", "lit.local.cfg"]
config.test_source_root = os.path.dirname(os.path.abspath(__file__))
# Output/ under the suite is ignored by .gitignore (lit_tests/**/Output/).
config.test_exec_root = os.path.join(config.test_source_root, "Output")

# ---- tools of the active environment ---------------------------------------------------
env_bin = os.path.dirname(sys.executable)
path = config.environment.get("PATH", os.environ.get("PATH", ""))
TOOLS = ("sgdgen", "sgdgen-opt", "filecheck")
found = {}
missing = []
for tool in TOOLS:
    exe = shutil.which(tool, path=env_bin) or shutil.which(tool, path=path)
    if exe is None:
        missing.append(tool)
    else:
        found[tool] = os.path.abspath(exe)
if missing:
    lit_config.fatal(
        f"cannot find {', '.join(missing)} in {env_bin} (the environment of {sys.executable}) "
        f"or on PATH. Install the project with its test extras into the environment that runs "
        f"lit: `{sys.executable} -m pip install -e '.[test]'`, or run lit from that environment."
    )

# The environment's bin dir first, then wherever a tool was found, then the old PATH.
dirs = [env_bin] + [os.path.dirname(exe) for exe in found.values()]
config.environment["PATH"] = os.pathsep.join(list(dict.fromkeys(dirs)) + [path])

# Longest names first: lit applies substitutions in order, and `%sgdgen` is a prefix
# of `%sgdgen-opt`.
config.substitutions.append(("%sgdgen-opt", found["sgdgen-opt"]))
config.substitutions.append(("%sgdgen", found["sgdgen"]))
config.substitutions.append(("%filecheck", found["filecheck"]))
config.substitutions.append(("%python", sys.executable))

# lit passes only a few variables through (PATH, HOME, TMPDIR, ...), so user flags such
# as XLA_FLAGS cannot change what a test sees. Nothing here needs an accelerator.
config.environment["JAX_PLATFORMS"] = "cpu"
