"""One hierarchy for every error sgdgen raises on purpose.

`SgdgenError` is the base; each subclass is also the built-in exception that Keras
raises in the same situation (`ValueError` for bad values, `TypeError` for bad types,
`KeyError` for an unknown variable), so code written for Keras keeps catching what it
caught. Every message names the variable or field, the constraint, and the fix.
"""

from __future__ import annotations


class SgdgenError(Exception):
    """Base of every error sgdgen raises on purpose (bugs surface as other exceptions)."""


class SpecError(SgdgenError, ValueError):
    """A mesh, layout or variable description that cannot be used, with the fix."""


class ConfigError(SgdgenError, ValueError):
    """A hyperparameter or option that is not valid."""


class GenerateError(SgdgenError, ValueError):
    """A config and variable list that cannot be turned into a step, with the fix."""


class PipelineError(SgdgenError, ValueError):
    """A pass pipeline string that does not parse, with MLIR's message."""


class StepInputError(SgdgenError, ValueError):
    """An argument that does not match the compiled step; nothing has run."""


class StepTypeError(SgdgenError, TypeError):
    """An argument of the wrong kind or dtype for the step; nothing has run."""


class UnknownVariableError(SgdgenError, KeyError):
    """A variable the optimizer was not built with."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else ""


class ArtifactError(SgdgenError, ValueError):
    """An artifact that cannot be written or read, with what differs and what to do."""


class BackendError(SgdgenError, RuntimeError):
    """The JAX/XLA installation cannot do what the step needs (missing devices, a moved API)."""


__all__ = ["ArtifactError", "BackendError", "ConfigError", "GenerateError", "PipelineError", "SgdgenError",
           "SpecError", "StepInputError", "StepTypeError", "UnknownVariableError"]
