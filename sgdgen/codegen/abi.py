"""The step's calling convention: the order of @main's arguments and results.

One object, `StepABI`, fixes it; the generator emits @main in this order, the passes
keep it, the artifact manifest records it and the runtime feeds and reads buffers by it.

Arguments: the state first, then the gradients, then the runtime scalars:

    iterations, variables[0..n), momenta[0..n), averages[0..n) (EMA only),
    gradients[0..n), learning_rate (only when the learning rate is not a schedule)

Results: the new state, in the same order as the state arguments, so result k
aliases argument k for every k (the in-place update of `sgd-alias-buffers`).
Keeping state at the front makes the aliasing table the identity prefix and leaves
room for flat buckets (one argument per role) later without reordering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sgdgen.frontend.spec import Layout, Mesh, VarSpec, tensor_type

ROLES = ("iterations", "variable", "momentum", "average", "gradient", "learning_rate")


@dataclass(frozen=True)
class Slot:
    """One argument or result of @main."""

    role: str  # one of ROLES
    var: int | None  # index into the variable list, None for scalars
    name: str  # a readable name, e.g. "SGD/m/dense/kernel"
    shape: tuple[int, ...]
    dtype: str
    layout: Layout

    @property
    def mlir_type(self) -> str:
        from sgdgen.frontend.spec import MLIR_ELEMENT_TYPES

        et = "i64" if self.dtype == "int64" else MLIR_ELEMENT_TYPES[self.dtype]
        return tensor_type(self.shape, et)

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "var": self.var, "name": self.name, "shape": list(self.shape),
                "dtype": self.dtype, "layout": self.layout.sharding_specs}


@dataclass(frozen=True)
class StepABI:
    """Argument and result order of one compiled step."""

    inputs: tuple[Slot, ...]
    outputs: tuple[Slot, ...]

    @classmethod
    def create(cls, variables: Sequence[VarSpec], mesh: Mesh, *, use_ema: bool, lr_input: bool,
               optimizer_name: str = "SGD") -> StepABI:
        scalar = Layout.replicated(mesh, 0)
        state = [Slot("iterations", None, "iteration", (), "int64", scalar)]
        state += [Slot("variable", i, v.name, v.shape, v.dtype, v.layout) for i, v in enumerate(variables)]
        state += [Slot("momentum", i, f"{optimizer_name}/m/{v.name}", v.shape, v.dtype, v.layout)
                  for i, v in enumerate(variables)]
        if use_ema:
            state += [Slot("average", i, f"{optimizer_name}/average/{v.name}", v.shape, v.dtype, v.layout)
                      for i, v in enumerate(variables)]
        inputs = list(state)
        inputs += [Slot("gradient", i, f"gradient/{v.name}", v.shape, v.dtype, v.layout)
                   for i, v in enumerate(variables)]
        if lr_input:
            inputs.append(Slot("learning_rate", None, "learning_rate", (), "float32", scalar))
        return cls(tuple(inputs), tuple(state))

    @property
    def aliases(self) -> dict[int, int]:
        """result index -> argument index it updates in place."""
        return {k: k for k in range(len(self.outputs))}

    def index(self, role: str, var: int | None = None, *, outputs: bool = False) -> int:
        """Position of the slot with this role (and variable index)."""
        seq = self.outputs if outputs else self.inputs
        for k, s in enumerate(seq):
            if s.role == role and s.var == var:
                return k
        raise KeyError(f"no {'result' if outputs else 'argument'} with role {role!r} for variable {var}")

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs],
                "aliases": {str(k): v for k, v in self.aliases.items()}}
