"""sgdgen: an ahead-of-time compiler and runtime for the Keras DTensor SGD optimizer."""

__version__ = "0.1.0"

from sgdgen import schedules
from sgdgen.config import EMAOption, GradientsClipOption, SGDConfig
from sgdgen.optimizer import SGD
from sgdgen.spec import Layout, Mesh, SpecError, VarSpec
from sgdgen.variable import Variable


__all__ = ["EMAOption", "GradientsClipOption", "Layout", "Mesh", "SGD", "SGDConfig", "SpecError", "VarSpec",
           "Variable", "__version__", "schedules"]
