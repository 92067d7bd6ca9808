"""sgdgen: an ahead-of-time compiler and runtime for the Keras DTensor SGD optimizer."""

__version__ = "0.1.0"

# Installed, passes/ and templates/ live inside this package (pyproject's package-dir map).
# In a source checkout they sit beside it; let `python -m sgdgen.cli` run from the checkout
# root (which puts the source tree first on sys.path) find them there.
import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "templates")) and _os.path.isfile(
        _os.path.join(_root, "templates", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (the package's own __path__)

from sgdgen import schedules
from sgdgen.config import EMAOption, GradientsClipOption, SGDConfig
from sgdgen.optimizer import SGD
from sgdgen.spec import Layout, Mesh, SpecError, VarSpec
from sgdgen.variable import Variable


__all__ = ["EMAOption", "GradientsClipOption", "Layout", "Mesh", "SGD", "SGDConfig", "SpecError", "VarSpec",
           "Variable", "__version__", "schedules"]
