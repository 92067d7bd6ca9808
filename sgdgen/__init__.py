"""sgdgen: an ahead-of-time compiler and runtime for the Keras DTensor SGD optimizer."""

from sgdgen._version import __version__

# Installed, passes/ and templates/ live inside this package (pyproject's package-dir map).
# In a source checkout they sit beside it; let `python -m sgdgen.tools.cli` run from the checkout
# root (which puts the source tree first on sys.path) find them there.
import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "templates")) and _os.path.isfile(
        _os.path.join(_root, "templates", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (the package's own __path__)

import sys as _sys

from sgdgen.api.sgd import SGD
from sgdgen.api.variable import Variable
from sgdgen.frontend import schedules
from sgdgen.frontend.config import EMAOption, GradientsClipOption, SGDConfig
from sgdgen.frontend.spec import Layout, Mesh, SpecError, VarSpec
from sgdgen.integrations.jax import JaxStep, check_in_place, jax_step

# `sgdgen.schedules` is public API (Keras' `keras.optimizers.schedules`): `from sgdgen.schedules
# import CosineDecay` keeps working although the module lives in the frontend stage.
_sys.modules.setdefault("sgdgen.schedules", schedules)


#: Integrations that import a third-party library, loaded on first access (`sgdgen.keras`,
#: `sgdgen.optax`): `import sgdgen` must not import keras or optax.
_LAZY = {"keras": "sgdgen.integrations.keras", "optax": "sgdgen.integrations.optax"}


def __getattr__(name: str):
    """`sgdgen.keras` / `sgdgen.optax`: import the integration module on first access."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        _sys.modules.setdefault(f"sgdgen.{name}", module)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sgdgen' has no attribute {name!r}")


__all__ = ["EMAOption", "GradientsClipOption", "JaxStep", "Layout", "Mesh", "SGD", "SGDConfig", "SpecError", "VarSpec",
           "Variable", "__version__", "check_in_place", "jax_step", "schedules"]
