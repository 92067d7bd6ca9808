"""The artifact manifest (`manifest.json`) as typed dataclasses, with strict reading.

Two versions decide whether an artifact can be used, each with a supported window
(docs/artifact-format.md keeps the dated changelog of both):

  FORMAT_VERSION              the layout of the directory and of this manifest
  CALLING_CONVENTION_VERSION  the order, roles, dtypes and aliasing of the step's
                              arguments and results (sgdgen.codegen.abi.StepABI)

A reader accepts any version inside its window and refuses one outside with the range
it reads. Every field is type-checked exactly (`true` is not the integer 1, `1.0` is not
a string); an error names the field and says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sgdgen.errors import ArtifactError

FORMAT_VERSION = 2
MIN_FORMAT_VERSION = 1
CALLING_CONVENTION_VERSION = 1
MIN_CALLING_CONVENTION_VERSION = 1

T = TypeVar("T")


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, *,
           optional: bool = False) -> Any:
    """data[key], refused unless its type is exactly `kind` (bool is not int)."""
    if key not in data:
        if optional:
            return None
        raise ArtifactError(f"{where}: manifest field {key!r} is missing; rewrite the artifact")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if type(value) not in kinds:
        names = " or ".join(k.__name__ for k in kinds)
        raise ArtifactError(f"{where}: manifest field {key!r} must be {names}, not {json.dumps(value)} "
                            f"({type(value).__name__}); rewrite the artifact")
    return value


def _str_map(data: dict[str, Any], key: str, where: str, convert: Callable[[Any, str], T]) -> dict[str, T]:
    raw = _typed(data, key, dict, where)
    return {name: convert(value, f"{key}[{name!r}]") for name, value in raw.items()}


def _jax_export(data: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The optional `jax_export` entry: {"file": str, "platforms": [str, ...]}."""
    entry = _typed(data, "jax_export", dict, where, optional=True)
    if entry is None:
        return None
    name = _typed(entry, "file", str, f"{where}: jax_export")
    platforms = _typed(entry, "platforms", list, f"{where}: jax_export")
    if not platforms or any(type(p) is not str for p in platforms) or "/" in name:
        raise ArtifactError(f"{where}: manifest field jax_export must name a file and a list of platforms, not "
                            f"{json.dumps(entry)}; rewrite the artifact")
    return {"file": name, "platforms": list(platforms)}


def _version(data: dict[str, Any], key: str, lo: int, hi: int, where: str, what: str) -> int:
    value = data.get(key)
    if type(value) is not int or not lo <= value <= hi:
        from sgdgen._version import __version__

        raise ArtifactError(f"{where}: {what} version {value!r} is outside the range this sgdgen ({__version__}) "
                            f"reads, {lo}..{hi}; recompile the artifact with this sgdgen")
    return value


@dataclass(frozen=True)
class ExecutableEntry:
    """One serialized PJRT executable and what it is bound to.

    `fingerprint` is sha256 over step.mlir and `compile_options`; the executable's HLO
    module is named `sgdgen_<fingerprint>` when it is compiled, so the binary itself says
    which module it came from. Format 1 entries have neither (None).
    """

    file: str
    platform: str
    platform_version: str
    jaxlib: str
    jax: str
    fingerprint: str | None = None
    compile_options: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "platform": self.platform,
                               "platform_version": self.platform_version, "jaxlib": self.jaxlib, "jax": self.jax}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
            out["compile_options"] = self.compile_options
        return out

    @classmethod
    def from_json(cls, data: Any, where: str, format_version: int) -> ExecutableEntry:
        if type(data) is not dict:
            raise ArtifactError(f"{where}: must be a JSON object; rewrite the artifact")
        strs = {k: _typed(data, k, str, where) for k in ("file", "platform", "platform_version", "jaxlib")}
        jax_version = _typed(data, "jax", str, where, optional=True) or ""
        fingerprint = options = None
        if format_version >= 2:
            fingerprint = _typed(data, "fingerprint", str, where)
            options = _typed(data, "compile_options", dict, where)
        return cls(jax=jax_version, fingerprint=fingerprint, compile_options=options, **strs)


@dataclass(frozen=True)
class Manifest:
    """manifest.json. `config`, `mesh`, `variables` and `abi` stay JSON here; their own
    `from_json` / `from_config` (and the ABI comparison in sgdgen.io.artifact) check them."""

    format_version: int
    calling_convention_version: int
    sgdgen_version: str
    stablehlo_target_version: str
    config: dict[str, Any]
    mesh: dict[str, Any]
    variables: list[Any]
    abi: dict[str, Any]
    executables: dict[str, ExecutableEntry] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    #: sha256 binding step.mlir to config, mesh, variables and ABI (sgdgen.io.artifact.binding);
    #: None in format 1.
    binding: str | None = None
    #: the step as a serialized jax.export.Exported: {"file": "step.jaxexport", "platforms": [...]};
    #: None when the artifact was written without one (optional since 2026-12-01, format 2).
    jax_export: dict[str, Any] | None = None
    #: a bucketed step's own variables (VarSpec JSON, the order its plan was made in), of which
    #: `variables` are the buffers; None otherwise (optional since 2026-12-02, format 2)
    members: list[Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version,
                "calling_convention_version": self.calling_convention_version,
                "sgdgen_version": self.sgdgen_version, "stablehlo_target_version": self.stablehlo_target_version,
                "config": self.config, "mesh": self.mesh, "variables": self.variables, "abi": self.abi,
                "binding": self.binding, "executables": {k: e.to_json() for k, e in self.executables.items()},
                "files": self.files, **({"jax_export": self.jax_export} if self.jax_export else {}),
                **({"members": self.members} if self.members is not None else {})}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def named_files(self) -> list[str]:
        """Every file this manifest refers to (each must be hashed in `files`)."""
        exported = [self.jax_export["file"]] if self.jax_export else []
        return ["step.mlir", "step.mlirbc", *(e.file for e in self.executables.values()), *exported]

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Checks versions first (so an artifact from a newer sgdgen says so), then every field."""
        if type(data) is not dict:
            raise ArtifactError(f"{where}: the manifest must be a JSON object; rewrite the artifact")
        # Format 1 called the format version `schema_version` and had no calling-convention version.
        key = "format_version" if "format_version" in data or "schema_version" not in data else "schema_version"
        fmt = _version(data, key, MIN_FORMAT_VERSION, FORMAT_VERSION, where, "format")
        if fmt >= 2:
            cc = _version(data, "calling_convention_version", MIN_CALLING_CONVENTION_VERSION,
                          CALLING_CONVENTION_VERSION, where, "calling-convention")
        else:
            cc = 1

        def digest(value: Any, what: str) -> str:
            if type(value) is not str or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ArtifactError(f"{where}: manifest field {what} must be a sha256 hex digest, not "
                                    f"{json.dumps(value)}; rewrite the artifact")
            return value

        executables = _str_map(data, "executables", where,
                               lambda v, w: ExecutableEntry.from_json(v, f"{where}: {w}", fmt))
        abi = _typed(data, "abi", dict, where)
        for part in ("inputs", "outputs"):
            _typed(abi, part, list, f"{where}: abi")
        return cls(format_version=fmt, calling_convention_version=cc,
                   sgdgen_version=_typed(data, "sgdgen_version", str, where),
                   stablehlo_target_version=_typed(data, "stablehlo_target_version", str, where),
                   config=_typed(data, "config", dict, where), mesh=_typed(data, "mesh", dict, where),
                   variables=_typed(data, "variables", list, where), abi=abi, executables=executables,
                   files=_str_map(data, "files", where, digest),
                   binding=digest(_typed(data, "binding", str, where), "binding") if fmt >= 2 else None,
                   jax_export=_jax_export(data, where), members=_typed(data, "members", list, where, optional=True))
