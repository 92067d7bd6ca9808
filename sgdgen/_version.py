"""The version of sgdgen (a leaf module, so every stage can read it without importing the package root)."""

__version__ = "0.1.0"
