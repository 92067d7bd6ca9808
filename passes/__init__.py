"""sgdgen's MLIR passes, registered by name (imported as `sgdgen.passes`).

Each pass is a Python callable `run(op, pass_)` over a `builtin.module`, added to a
`jaxlib.mlir.passmanager.PassManager` under its name by `sgdgen.codegen.pipeline`, so that a
pipeline string mixes them freely with upstream passes:

    builtin.module(sgd-fuse-step,sgd-insert-collectives,sgd-alias-buffers,canonicalize,cse)

Bad input IR is reported as an MLIR error diagnostic at the offending op, followed by
pass failure: the user sees `file:line:col: error: ...`, never a Python traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its pipeline name, one-line summary and entry point."""

    name: str
    summary: str
    run: Callable[..., None]
    #: option names the pass takes in a pipeline (`name{option=value}`), passed to `run` as keywords
    options: tuple[str, ...] = ()


PASSES: dict[str, PassInfo] = {}


def register(name: str, summary: str, options: tuple[str, ...] = ()) -> Callable[[Callable[..., None]],
                                                                               Callable[..., None]]:
    """Decorator: registers `run(op, pass_, **options)` under `name`."""

    def wrap(run: Callable[..., None]) -> Callable[..., None]:
        PASSES[name] = PassInfo(name, summary, run, options)
        return run

    return wrap


from sgdgen.passes import alias_buffers, cpu_kernels, cpu_update, fuse_step, insert_collectives, shard_weight_update  # noqa: E402,F401  (registration)
