"""sgdgen: an ahead-of-time compiler and runtime for the Keras DTensor SGD optimizer."""

from sgdgen.spec import Layout, Mesh, SpecError, VarSpec

__version__ = "0.1.0"

__all__ = ["Layout", "Mesh", "SpecError", "VarSpec", "__version__"]
