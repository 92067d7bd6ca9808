"""One step program per (config, variables' signature, mesh), compiled once.

`StepProgram` holds everything that shapes the program; its calling convention
(`abi`), stage-0 and lowered texts are derived from it, each once. Its `signature`
leaves out a float learning rate (a runtime argument), so programs that differ only in
it share one executable. Executables come from an `ExecutableCache`
(sgdgen.runtime.cache): memory, sgdgen's on-disk store, or a fresh compile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sgdgen.codegen.abi import StepABI
from sgdgen.frontend.spec import Mesh, VarSpec
from sgdgen.runtime.cache import CacheStats, ExecutableCache, default_cache
from sgdgen.runtime.executable import StepExecutable


@dataclass(frozen=True, eq=True)
class StepProgram:
    """The inputs that determine one compiled step."""

    config: Any
    variables: tuple[VarSpec, ...]
    mesh: Mesh
    #: per variable, the mesh axes its gradient arrives unreduced over (`StepABI.create`); () when
    #: all are reduced. Only a caller inside JAX's explicit-sharding mode has such gradients
    #: (`sgdgen.jax_step`); StepExecutable and SGD always feed reduced arrays.
    unreduced_gradients: tuple[tuple[str, ...], ...] = ()
    #: per variable, None or the (name, shape) pieces its gradient arrives in (`StepABI.create`):
    #: `sgdgen.SGD(buckets=True)` feeds a flat bucket its members' gradients without packing them
    gradient_segments: tuple[Any, ...] = ()

    def __hash__(self) -> int:  # asked every step by the cache: hash the config and 400 specs once
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash((self.config, self.variables, self.mesh, self.unreduced_gradients,
                                                self.gradient_segments))
        return h

    @cached_property
    def abi(self) -> StepABI:
        return StepABI.for_config(self.variables, self.mesh, self.config, unreduced_gradients=self.unreduced_gradients,
                                  gradient_segments=self.gradient_segments)

    @cached_property
    def signature(self) -> StepProgram:
        """This program with a float learning rate normalised away (it is a runtime input)."""
        config = self.config
        if not config.lr_is_schedule and config.learning_rate != 0.0:
            config = dataclasses.replace(config, learning_rate=0.0)
            return dataclasses.replace(self, config=config)
        return self

    @cached_property
    def stage0_text(self) -> str:
        from sgdgen.codegen.generate import generate_text

        return generate_text(self.config, self.variables, self.mesh, self.unreduced_gradients, self.gradient_segments)

    @cached_property
    def lowered_text(self) -> str:
        from sgdgen.codegen.pipeline import pipeline_for, run_pipeline

        if self.signature is not self:  # a float learning rate is not in the module: share the text
            return self.signature.lowered_text
        return run_pipeline(self.stage0_text, pipeline_for(self.abi.shard_update_over))

    def executable(self, cache: ExecutableCache | None = None) -> StepExecutable:
        """The compiled step, from `cache` (default: the process-wide one)."""
        return (cache or default_cache()).get(self)


def __getattr__(name: str) -> Any:
    # `program.STATS`: the process-wide cache's counters (looked up each time, so a replaced
    # cache is seen).
    if name == "STATS":
        return default_cache().stats
    raise AttributeError(name)


__all__ = ["CacheStats", "StepProgram"]
