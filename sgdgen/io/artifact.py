"""Artifact directories: the compiled step as a versioned, inspectable, checked bundle.

    DIR/step.mlir          the lowered (stage-1) module, text
    DIR/step.mlirbc        the same as a StableHLO portable artifact (target version in the
                           manifest); sdy ops ride along as MLIR bytecode (allow_other_dialects).
                           VHLO keeps an all_reduce's channel id but not its type, so the module
                           reads back with `type = 0` where step.mlir has JAX's `type = 1`; XLA
                           uses only the id for an all-reduce, and the numbers are the same.
    DIR/manifest.json      schema, versions, config, mesh, variables, argument/result order,
                           aliasing, sha256 of every other file
    DIR/executable-<platform>.bin   a serialized PJRT executable for the platform that wrote it

Loading verifies the schema, every hash, the mesh and the variables' signature, and
refuses any mismatch with an error that says what differs and what to do. An
executable from another platform or jaxlib is rebuilt from step.mlirbc, with a warning.

Schema history (bump SCHEMA_VERSION on any change, keep readers for the window):
  1 (2026-11-25): first version.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgdgen._version import __version__
from sgdgen import backend
from sgdgen.frontend.config import SGDConfig
from sgdgen.runtime.program import StepProgram
from sgdgen.runtime.executable import StepExecutable
from sgdgen.frontend.spec import Mesh, VarSpec

SCHEMA_VERSION = 1
MIN_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact that cannot be used as it is, with what differs and what to do."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _executable_name(platform: str) -> str:
    return f"executable-{platform}.bin"


def _portable(text: str) -> tuple[bytes, str]:
    from jaxlib.mlir.dialects import stablehlo

    from sgdgen.codegen.ir import make_context, parse_module

    target = stablehlo.get_current_version()
    module = parse_module(text, make_context())
    return bytes(stablehlo.serialize_portable_artifact(module, target, True)), target


def _from_portable(blob: bytes) -> str:
    from jaxlib.mlir.dialects import stablehlo

    from sgdgen.codegen.ir import make_context

    ctx = make_context()
    with ctx:
        return str(stablehlo.deserialize_portable_artifact(ctx, blob))


def write(program: StepProgram, path: str | os.PathLike[str], *, executable: bool = True) -> Path:
    """Writes `program`'s artifact into directory `path` (created; existing files replaced)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {"step.mlir": program.lowered_text.encode()}
    blob, target = _portable(program.lowered_text)
    files["step.mlirbc"] = blob
    fp = backend.platform_fingerprint()
    if executable:
        from sgdgen.runtime.program import executable_for

        files[_executable_name(fp["platform"])] = backend.serialize_executable(executable_for(program).executable)
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "sgdgen_version": __version__,
        "stablehlo_target_version": target,
        "config": program.config.get_config(),
        "mesh": program.mesh.to_json(),
        "variables": [v.to_json() for v in program.variables],
        "abi": program.abi.to_json(),
        "executables": {fp["platform"]: {"file": _executable_name(fp["platform"]), **fp}} if executable else {},
        "files": {name: _sha256(out / name) for name in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@dataclass
class Artifact:
    """A verified artifact directory."""

    path: Path
    manifest: dict[str, Any]
    program: StepProgram

    def executable(self) -> StepExecutable:
        """The step for this process: the stored executable when platform and jaxlib match,
        otherwise rebuilt from step.mlirbc (with a warning)."""
        fp = backend.platform_fingerprint()
        devices = backend.devices_for(self.program.mesh.device_ids)
        entry = self.manifest["executables"].get(fp["platform"])
        exe = None
        if entry and all(entry.get(k) == fp[k] for k in ("jaxlib", "platform_version")):
            exe = backend.deserialize_executable((self.path / entry["file"]).read_bytes(), devices)
        else:
            why = (f"it was built by jaxlib {entry.get('jaxlib')} on {entry.get('platform_version')}" if entry
                   else f"it has no executable for {fp['platform']}")
            warnings.warn(f"artifact {self.path}: {why}; rebuilding the step from step.mlirbc "
                          f"(jaxlib {fp['jaxlib']}, {fp['platform']})", stacklevel=2)
            exe = backend.compile_text(_from_portable((self.path / "step.mlirbc").read_bytes()), devices)
        return StepExecutable.wrap(exe, self.program.abi, self.program.mesh)


def read(path: str | os.PathLike[str], *, mesh: Mesh | None = None,
         variables: list[VarSpec] | None = None) -> Artifact:
    """Reads and verifies an artifact; `mesh` / `variables`, when given, must match it."""
    root = Path(path)
    mf = root / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; this is not an sgdgen artifact (write one with "
                            "`sgdgen compile ... -o DIR` or opt.save_artifact(DIR))")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf}: corrupt manifest ({e}); rewrite the artifact") from e
    schema = manifest.get("schema_version")
    if not isinstance(schema, int) or not MIN_SCHEMA_VERSION <= schema <= SCHEMA_VERSION:
        raise ArtifactError(f"{root}: schema version {schema!r} is outside the range this sgdgen "
                            f"({__version__}) reads, {MIN_SCHEMA_VERSION}..{SCHEMA_VERSION}; recompile it with this "
                            "sgdgen")
    for name, digest in manifest.get("files", {}).items():
        f = root / name
        if not f.is_file():
            raise ArtifactError(f"{root}: {name} is missing; the artifact is incomplete, rewrite it")
        if _sha256(f) != digest:
            raise ArtifactError(f"{root}: {name} does not match its sha256 in the manifest (corrupt or edited); "
                                "rewrite the artifact")
    for needed in ("step.mlir", "step.mlirbc"):
        if needed not in manifest.get("files", {}):
            raise ArtifactError(f"{root}: the manifest lists no {needed}; rewrite the artifact")
    try:
        stored_mesh = Mesh.from_json(manifest["mesh"])
        config = SGDConfig.from_config(manifest["config"])
        specs = tuple(VarSpec.from_json(v, stored_mesh, where=f"variables[{k}]")
                      for k, v in enumerate(manifest["variables"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{root}: manifest field is invalid: {e}; rewrite the artifact") from e
    if mesh is not None and Mesh.of(mesh) != stored_mesh:
        raise ArtifactError(f"{root}: compiled for mesh {stored_mesh} (devices {list(stored_mesh.device_ids)}), "
                            f"but mesh {Mesh.of(mesh)} (devices {list(Mesh.of(mesh).device_ids)}) was given; "
                            "recompile for this mesh")
    if variables is not None:
        _compare_variables(root, list(specs), list(variables))
    program = StepProgram(config, specs, stored_mesh)
    if (root / "step.mlir").read_text() != program.lowered_text:
        raise ArtifactError(f"{root}: step.mlir differs from what this sgdgen ({__version__}) generates for the "
                            "manifest's config and variables (a stale artifact); recompile it")
    return Artifact(root, manifest, program)


def _compare_variables(root: Path, stored: list[VarSpec], given: list[VarSpec]) -> None:
    if len(stored) != len(given):
        raise ArtifactError(f"{root}: compiled for {len(stored)} variables, {len(given)} given; recompile for "
                            "this model")
    for k, (s, g) in enumerate(zip(stored, given)):
        for field_ in ("name", "shape", "dtype", "decay"):
            if getattr(s, field_) != getattr(g, field_):
                raise ArtifactError(f"{root}: variable {k} ({g.name!r}) has {field_} {getattr(g, field_)!r}, the "
                                    f"artifact was compiled for {getattr(s, field_)!r}; recompile for this model")
        if s.layout.dims != g.layout.dims:
            raise ArtifactError(f"{root}: variable {g.name!r} is laid out {g.layout.sharding_specs}, the artifact "
                                f"was compiled for {s.layout.sharding_specs}; recompile or relayout the variable")


def summary(art: Artifact) -> dict[str, Any]:
    """What `sgdgen inspect` prints: variables, bytes of state, collectives, fusions, versions."""
    p = art.program
    state_bytes = sum(v.nbytes for v in p.variables) * (3 if p.config.use_ema else 2) + 8
    text = (art.path / "step.mlir").read_text()
    return {
        "path": str(art.path),
        "schema_version": art.manifest["schema_version"],
        "sgdgen_version": art.manifest["sgdgen_version"],
        "stablehlo_target_version": art.manifest["stablehlo_target_version"],
        "mesh": str(p.mesh) or "(one device)",
        "variables": len(p.variables),
        "parameters": sum(v.nbytes // max(1, _itemsize(v)) for v in p.variables),
        "state_bytes": state_bytes,
        "all_reduce": text.count("stablehlo.all_reduce"),
        "manual_computation": text.count("sdy.manual_computation"),
        "aliased_buffers": len(p.abi.aliases),
        "executables": {k: {"jaxlib": v.get("jaxlib"), "platform_version": v.get("platform_version")}
                        for k, v in art.manifest["executables"].items()},
        "config": art.manifest["config"],
    }


def _itemsize(v: VarSpec) -> int:
    from sgdgen.frontend.spec import numpy_dtype

    return numpy_dtype(v.dtype).itemsize
