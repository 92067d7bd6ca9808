"""Artifact directories: the compiled step as a versioned, inspectable, checked bundle.

    DIR/step.mlir          the lowered (stage-1) module, text: the module the artifact IS
    DIR/step.mlirbc        the same as a StableHLO portable artifact (target version in the
                           manifest); sdy ops ride along as MLIR bytecode (allow_other_dialects).
                           VHLO keeps an all_reduce's channel id but not its type, so the module
                           reads back with `type = 0` where step.mlir has JAX's `type = 1`; XLA
                           uses only the id for an all-reduce, and the numbers are the same.
    DIR/manifest.json      format and calling-convention versions, config, mesh, variables, the
                           recorded ABI, executables with their fingerprints, sha256 of every file
    DIR/executable-<platform>.bin   a serialized PJRT executable for the platform that wrote it

Loading trusts the hashed module and the recorded ABI: it checks versions against their
windows (sgdgen.io.manifest), every hash, the mesh, the variables and the recorded ABI against
the ABI those variables give, and never regenerates the module. A stored executable is used
only when it is bound to step.mlir (its HLO module is named after the fingerprint of step.mlir
and the compile options) and its parameter and result shapes and shardings are the ABI's;
otherwise it is refused before it runs. One from another platform or jaxlib, or a format-1
executable (no fingerprint), is rebuilt from step.mlirbc with a warning.

Writing compiles the module afresh (never a cached or deserialized executable: on CPU in
jaxlib 0.10.2 serialize -> deserialize -> serialize drops compiled code), deserializes what it
serialized and runs it against the fresh executable on the same random inputs, then writes
into a new directory beside the target, fsyncs, and renames it into place: the path holds the
old artifact or the new one, never a mix; a directory left by a killed writer is named
`.NAME.incomplete-*` and is never at the path. Nothing is written through a symlink.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sgdgen._version import __version__
from sgdgen import backend
from sgdgen.frontend.config import SGDConfig
from sgdgen.frontend.spec import Mesh, VarSpec
from sgdgen.io.manifest import (CALLING_CONVENTION_VERSION, FORMAT_VERSION, MIN_FORMAT_VERSION, ArtifactError,
                                ExecutableEntry, Manifest)
from sgdgen.runtime import cpu_kernels
from sgdgen.runtime.executable import StepExecutable, slot_dtype
from sgdgen.runtime.program import StepProgram

__all__ = ["Artifact", "ArtifactError", "FORMAT_VERSION", "MIN_FORMAT_VERSION", "MANIFEST", "Manifest", "binding",
           "check_fresh", "fingerprint", "read", "summary", "write"]

MANIFEST = "manifest.json"
EXPORTED = "step.jaxexport"
#: the names `write` gives its temporary directories beside the target
_LEFTOVER = re.compile(r"\..+\.(incomplete|replaced)-[0-9a-f]{8}")
_MODULE_PREFIX = "sgdgen_"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _executable_name(platform: str) -> str:
    return f"executable-{platform}.bin"


def binding(module_text: bytes, manifest: Manifest) -> str:
    """sha256 of step.mlir and the manifest's description of it (config, mesh, variables, ABI):
    an edit to either side alone is seen at load."""
    h = hashlib.sha256(module_text)
    described = [manifest.config, manifest.mesh, manifest.variables, manifest.abi]
    if manifest.members is not None:  # a bucketed step's variables (absent: the digest of before)
        described.append(manifest.members)
    h.update(json.dumps(described, sort_keys=True).encode())
    return h.hexdigest()


def fingerprint(binding_digest: str, compile_options: dict[str, Any]) -> str:
    """What binds an executable to its module: the module's binding and the compile options."""
    return _sha256(json.dumps([binding_digest, compile_options], sort_keys=True).encode())


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


def _named(text: str, name: str) -> str:
    """`text` with its module renamed to `name` (the HLO module, and so the executable, keeps it)."""
    from jaxlib.mlir import ir

    from sgdgen.codegen.ir import make_context, parse_module

    ctx = make_context()
    module = parse_module(text, ctx)
    with ctx:
        module.operation.attributes["sym_name"] = ir.StringAttr.get(name)
        return str(module)


# ---- writing ----------------------------------------------------------------------------


def _random_host_inputs(abi: Any, seed: int) -> list[Any]:
    """Reproducible step inputs on the host: uniform in [-1, 1) (drawn in float32: a float64
    normal draw took 17 s of a 28 s save at 51M parameters on 8 devices)."""
    rng = np.random.default_rng(seed)
    out: list[Any] = []
    for slot in abi.inputs:
        if slot.role == "iterations":
            out.append(np.int64(rng.integers(0, 1000)))
        elif slot.role == "learning_rate":
            out.append(np.float32(0.1))
        else:
            x = rng.random(slot.shape, dtype=np.float32)
            x *= 2
            x -= 1
            out.append(x.astype(slot_dtype(slot), copy=False))
    return out


def _verified_executable(program: StepProgram, devices: list[Any], platform: dict[str, str], name: str) -> bytes:
    """A fresh compile of the module (named `name`), serialized, with the bytes checked: they
    deserialize to an executable that gives the fresh one's results, bit for bit."""
    fresh = StepExecutable.wrap(cpu_kernels.compile_text(_named(program.lowered_text, name), devices),
                                program.abi, program.mesh)
    blob = backend.serialize_executable(fresh.executable)
    loaded = StepExecutable.wrap(cpu_kernels.deserialize_executable(blob, devices), program.abi, program.mesh)
    _check_signature(Path("<new artifact>"), loaded, name)
    host = _random_host_inputs(program.abi, 0)
    want = fresh([fresh.put(slot, x) for slot, x in zip(program.abi.inputs, host)])
    got = loaded([loaded.put(slot, x) for slot, x in zip(program.abi.inputs, host)])
    for slot, a, b in zip(program.abi.outputs, want, got):
        if np.asarray(a).tobytes() != np.asarray(b).tobytes():
            raise ArtifactError(f"the serialized executable does not reproduce the compiled step ({slot.name!r} "
                                f"differs; jaxlib {platform['jaxlib']}); write the artifact with "
                                "executable=False (the step is then compiled from step.mlirbc at load)")
    return blob


def _check_target(out: Path) -> None:
    """Refuses a target we must not replace: a symlink, a file, a directory that is not an
    artifact, or an artifact that holds a directory."""
    if out.is_symlink():
        raise ArtifactError(f"{out} is a symlink; an artifact is never written through one: give the real path")
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; give a new or an artifact directory")
    entries = list(out.iterdir())
    if entries and not (out / MANIFEST).is_file():
        raise ArtifactError(f"{out} is a non-empty directory without {MANIFEST} (not an sgdgen artifact); it is "
                            "not replaced: give a new or an artifact directory")
    # A symlink planted inside goes with the old artifact (unlinked, never followed); a
    # directory is not ours to delete.
    dirs = [p.name for p in entries if p.is_dir() and not p.is_symlink()]
    if dirs:
        raise ArtifactError(f"{out} holds a directory {dirs[0]!r}, which no sgdgen artifact has; it is not "
                            "replaced: remove it, or give another directory")


def _write_file(dirfd: int, name: str, data: bytes) -> None:
    """Creates `name` in the directory `dirfd` (never an existing file, never through a symlink),
    writes `data` and fsyncs it."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dirfd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Moves the complete directory `tmp` to `out`, replacing an artifact there: at every instant
    `out` is the old artifact or the new one (with the fallback for filesystems without
    RENAME_EXCHANGE, briefly absent, the old one kept aside until the new one is in)."""
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the old artifact
    else:
        aside = tmp.with_name(tmp.name.replace(".incomplete-", ".replaced-"))
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)  # the old artifact back at the path
            raise
        shutil.rmtree(aside)
    _fsync_dir(out.parent)


def write(program: StepProgram, path: str | os.PathLike[str], *, executable: bool = True,
          platforms: Sequence[str] | None = None, members: Sequence[Any] | None = None) -> Path:
    """Writes `program`'s artifact to directory `path` atomically (an artifact there is replaced
    as a whole); returns the path. `platforms`: what `step.jaxexport` (the step as a serialized
    `jax.export.Exported`) is lowered for; default this process's platform, `()` for none.
    `members`: for a step over flat buckets, the VarSpecs its buckets were planned from."""
    out = Path(path)
    _check_target(out)
    backend.devices_for(program.mesh.device_ids)  # the mesh's devices exist (a clear error, before any work)
    text = program.lowered_text.encode()
    files: dict[str, bytes] = {"step.mlir": text}
    files["step.mlirbc"], target = _portable(program.lowered_text)
    manifest = Manifest(format_version=FORMAT_VERSION, calling_convention_version=CALLING_CONVENTION_VERSION,
                        sgdgen_version=__version__, stablehlo_target_version=target,
                        **json.loads(json.dumps({"config": program.config.get_config(), "mesh": program.mesh.to_json(),
                                                 "variables": [v.to_json() for v in program.variables],
                                                 "abi": program.abi.to_json()})),
                        members=None if members is None else json.loads(json.dumps([v.to_json() for v in members])))
    if platforms is None:
        platforms = (backend.platform_fingerprint()["platform"],)
    if platforms:
        from sgdgen.io.export import export_step

        files[EXPORTED] = export_step(program, platforms)
        manifest = dataclasses.replace(manifest, jax_export={"file": EXPORTED, "platforms": list(platforms)})
    bound = binding(text, manifest)
    entries: dict[str, ExecutableEntry] = {}
    if executable:
        fp = backend.platform_fingerprint()
        devices = backend.devices_for(program.mesh.device_ids)
        options = cpu_kernels.compile_options_summary(devices)
        digest = fingerprint(bound, options)
        entry = ExecutableEntry(file=_executable_name(fp["platform"]), fingerprint=digest, compile_options=options,
                                **fp)
        files[entry.file] = _verified_executable(program, devices, fp, _MODULE_PREFIX + digest)
        entries[fp["platform"]] = entry
    manifest = dataclasses.replace(manifest, binding=bound, executables=entries,
                                   files={name: _sha256(data) for name, data in files.items()})
    files[MANIFEST] = manifest.dumps().encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.incomplete-{secrets.token_hex(4)}")
    os.mkdir(tmp, 0o755)
    try:
        dirfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name, data in files.items():  # the manifest last
                _write_file(dirfd, name, data)
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- reading ----------------------------------------------------------------------------


def _read_file(root: Path, name: str) -> bytes:
    """The bytes of root/name, refusing a symlink."""
    try:
        fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ArtifactError(f"{root}: {name} is missing; the artifact is incomplete, rewrite it") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"{root}: {name} is a symlink; an artifact's files are read only as regular "
                                "files: rewrite the artifact") from None
        raise ArtifactError(f"{root}: {name} cannot be read ({e.strerror}); rewrite the artifact") from e
    with os.fdopen(fd, "rb") as f:
        return f.read()


@dataclass
class Artifact:
    """A verified artifact directory: its manifest, its files' verified bytes, the program."""

    path: Path
    manifest: Manifest
    program: StepProgram
    blobs: dict[str, bytes]

    @property
    def module_text(self) -> str:
        return self.blobs["step.mlir"].decode()

    def check(self, *, mesh: Mesh | Any = None, variables: list[VarSpec] | None = None) -> None:
        """Raises ArtifactError unless `mesh` / `variables` (when given) are the artifact's; for
        variables, also the recorded ABI must be the one they give."""
        root, stored_mesh = self.path, self.program.mesh
        if mesh is not None and Mesh.of(mesh) != stored_mesh:
            raise ArtifactError(f"{root}: compiled for mesh {stored_mesh} (devices {list(stored_mesh.device_ids)}), "
                                f"but mesh {Mesh.of(mesh)} (devices {list(Mesh.of(mesh).device_ids)}) was given; "
                                "recompile for this mesh")
        if variables is not None:
            _compare_variables(root, list(self.program.variables), list(variables))
            given = StepProgram(self.program.config, tuple(variables), stored_mesh)
            _compare_abi(root, self.manifest.abi, given.abi.to_json())

    def jax_exported(self) -> Any:
        """The step as a `jax.export.Exported` (from the verified `step.jaxexport`): call it with the
        arguments in `manifest.abi` order, eagerly or inside a jit; ArtifactError when absent."""
        import jax

        if not self.manifest.jax_export:
            raise ArtifactError(f"{self.path}: this artifact carries no jax.export module; rewrite it with "
                                "`sgdgen compile --platforms cpu` (or save_artifact(path, platforms=['cpu']))")
        return jax.export.deserialize(bytearray(self.blobs[self.manifest.jax_export["file"]]))

    def executable(self) -> StepExecutable:
        """The step for this process: the stored executable when it is bound to step.mlir and
        built by this platform and jaxlib with today's compile options, checked against the ABI
        before it runs; otherwise compiled from step.mlirbc (with a warning)."""
        fp = backend.platform_fingerprint()
        devices = backend.devices_for(self.program.mesh.device_ids)
        entry = self.manifest.executables.get(fp["platform"])
        why = _unusable(entry, fp, cpu_kernels.compile_options_summary(devices))
        if why is None:
            assert entry is not None and entry.fingerprint is not None
            name = _MODULE_PREFIX + entry.fingerprint
            blob = self.blobs[entry.file]
            if name.encode() not in blob:  # cheap pre-check: refuse a foreign binary before deserializing it
                raise _not_bound(self.path, entry.file)
            import jax

            try:
                exe = cpu_kernels.deserialize_executable(blob, devices)
            except jax.errors.JaxRuntimeError as e:
                raise ArtifactError(f"{self.path}: {entry.file} does not deserialize ({e}); it was not run: rewrite "
                                    "the artifact, or delete the executable to compile from step.mlirbc") from e
            step = StepExecutable.wrap(exe, self.program.abi, self.program.mesh)
            _check_signature(self.path / entry.file, step, name)
            return step
        warnings.warn(f"artifact {self.path}: {why}; rebuilding the step from step.mlirbc "
                      f"(jaxlib {fp['jaxlib']}, {fp['platform']})", stacklevel=2)
        exe = cpu_kernels.compile_text(_from_portable(self.blobs["step.mlirbc"]), devices)
        return StepExecutable.wrap(exe, self.program.abi, self.program.mesh)


def _unusable(entry: ExecutableEntry | None, fp: dict[str, str], options: dict[str, Any]) -> str | None:
    """Why the stored executable is not for this process (None when it is)."""
    if entry is None:
        return f"it has no executable for {fp['platform']}"
    if entry.jaxlib != fp["jaxlib"] or entry.platform_version != fp["platform_version"]:
        return f"it was built by jaxlib {entry.jaxlib} on {entry.platform_version}"
    if entry.fingerprint is None:
        return "its executable (format 1) is not bound to its module"
    if entry.compile_options != options:
        return "its executable was compiled with other compile options"
    return None


def _not_bound(where: Path, name: str) -> ArtifactError:
    return ArtifactError(f"{where}: {name} was not compiled from this artifact's step.mlir (its fingerprint "
                         "differs: an executable from another artifact, or damaged); it was not run: rewrite "
                         "the artifact, or delete the executable to compile from step.mlirbc")


def _check_signature(where: Path, step: StepExecutable, name: str) -> None:
    """Refuses an executable whose module name, parameters or results are not the ABI's."""
    if backend.executable_module_name(step.executable) != name:
        raise _not_bound(where.parent, where.name)
    params, results = backend.executable_signature(step.executable)
    for what, slots, rows, shardings in (("argument", step.abi.inputs, params, step.in_shardings),
                                         ("result", step.abi.outputs, results, step.out_shardings)):
        if len(rows) != len(slots):
            raise ArtifactError(f"{where}: the executable has {len(rows)} {what}s, the ABI {len(slots)}; it was not "
                                "run: rewrite the artifact")
        for k, (slot, (shape, dtype, hlo), sharding) in enumerate(zip(slots, rows, shardings)):
            want_shape = tuple(sharding.shard_shape(slot.shape))
            if (shape != want_shape or dtype != slot_dtype(slot)
                    or not backend.sharding_matches(hlo, sharding, len(slot.shape))):
                raise ArtifactError(
                    f"{where}: {what} {k} ({slot.name!r}) of the executable is {dtype}{list(shape)} laid out {hlo}, "
                    f"the ABI's is {slot_dtype(slot)}{list(want_shape)} per device laid out {sharding.spec}; it was "
                    "not run: rewrite the artifact")


def read(path: str | os.PathLike[str], *, mesh: Mesh | Any = None,
         variables: list[VarSpec] | None = None) -> Artifact:
    """Reads and verifies an artifact (each file read once); `mesh` / `variables`, when
    given, must match it (see `Artifact.check`)."""
    root = Path(path)
    if _LEFTOVER.fullmatch(root.name):
        raise ArtifactError(f"{root}: a directory left by an interrupted save (a new artifact not yet renamed "
                            "into place, or the old one set aside); it is never loaded: delete it, or rename it to "
                            "the artifact's name to keep it")
    if root.is_symlink() or not (root / MANIFEST).is_file():
        what = "is a symlink" if root.is_symlink() else f"has no {MANIFEST}"
        raise ArtifactError(f"{root}: {what}; this is not an sgdgen artifact (write one with "
                            "`sgdgen compile ... -o DIR` or opt.save_artifact(DIR))")
    raw = _read_file(root, MANIFEST)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{root / MANIFEST}: corrupt manifest ({e}); rewrite the artifact") from e
    manifest = Manifest.from_json(data, str(root))
    for needed in manifest.named_files():
        if needed not in manifest.files:
            raise ArtifactError(f"{root}: the manifest names {needed} but lists no sha256 for it; rewrite the "
                                "artifact")
    blobs: dict[str, bytes] = {}
    for name, digest in manifest.files.items():
        if "/" in name or name in ("", ".", "..", MANIFEST):
            raise ArtifactError(f"{root}: the manifest lists {name!r}, which is not a file of an artifact; "
                                "rewrite the artifact")
        blobs[name] = _read_file(root, name)
        if _sha256(blobs[name]) != digest:
            raise ArtifactError(f"{root}: {name} does not match its sha256 in the manifest (corrupt or edited); "
                                "rewrite the artifact")
    try:
        stored_mesh = Mesh.from_json(manifest.mesh)
        config = SGDConfig.from_config(manifest.config)
        specs = tuple(VarSpec.from_json(v, stored_mesh, where=f"variables[{k}]")
                      for k, v in enumerate(manifest.variables))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{root}: manifest field is invalid: {e}; rewrite the artifact") from e
    if manifest.binding is not None:  # format 2 on
        bound = binding(blobs["step.mlir"], manifest)
        if bound != manifest.binding:
            raise ArtifactError(f"{root}: step.mlir and the manifest's config, mesh, variables or ABI are not the ones "
                                "the artifact was written with (one was edited); rewrite the artifact")
        for entry in manifest.executables.values():
            if fingerprint(bound, entry.compile_options or {}) != entry.fingerprint:
                raise _not_bound(root, entry.file)
    program = StepProgram(config, specs, stored_mesh)
    # The artifact's module is step.mlir (hashed above), not what today's generator would emit:
    # seed the program's cached lowered text with it, so nothing regenerates it.
    vars(program)["lowered_text"] = blobs["step.mlir"].decode()
    art = Artifact(root, manifest, program, blobs)
    _compare_abi(root, manifest.abi, program.abi.to_json())
    art.check(mesh=mesh, variables=variables)
    return art


def _compare_abi(root: Path, recorded: dict[str, Any], expected: dict[str, Any]) -> None:
    expected = json.loads(json.dumps(expected))
    for part in ("inputs", "outputs"):
        have, want = recorded.get(part), expected[part]
        if have == want:
            continue
        if not isinstance(have, list) or len(have) != len(want):
            raise ArtifactError(f"{root}: the recorded ABI has {len(have or [])} {part}, these variables give "
                                f"{len(want)}; recompile the artifact for them")
        k = next(k for k, (h, w) in enumerate(zip(have, want)) if h != w)
        raise ArtifactError(f"{root}: the recorded ABI's {part}[{k}] is {have[k]}, these variables give {want[k]}; "
                            "recompile the artifact for them")
    if recorded.get("aliases") != expected["aliases"]:
        raise ArtifactError(f"{root}: the recorded ABI's aliasing {recorded.get('aliases')} is not "
                            f"{expected['aliases']}; recompile the artifact")


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


def check_fresh(art: Artifact) -> str | None:
    """A report, not a load check: how step.mlir differs from what today's generator emits for
    the manifest's config and variables (None when it is the same)."""
    today = StepProgram(art.program.config, art.program.variables, art.program.mesh).lowered_text
    if today == art.module_text:
        return None
    import difflib

    diff = difflib.unified_diff(art.module_text.splitlines(), today.splitlines(), "step.mlir",
                                f"today (sgdgen {__version__})", lineterm="", n=1)
    return "\n".join(diff)


def summary(art: Artifact) -> dict[str, Any]:
    """What `sgdgen inspect` prints: versions, variables, bytes of state, collectives, executables."""
    p, m = art.program, art.manifest
    state_bytes = sum(v.nbytes for v in p.variables) * (3 if p.config.use_ema else 2) + 8
    text = art.module_text
    return {
        "path": str(art.path),
        "format_version": m.format_version,
        "calling_convention_version": m.calling_convention_version,
        "sgdgen_version": m.sgdgen_version,
        "stablehlo_target_version": m.stablehlo_target_version,
        "mesh": str(p.mesh) or "(one device)",
        "variables": len(p.variables),
        "variable_table": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype,
                            "layout": v.layout.sharding_specs, "decay": v.decay} for v in p.variables],
        "parameters": sum(v.nbytes // max(1, _itemsize(v)) for v in p.variables),
        "state_bytes": state_bytes,
        "all_reduce": text.count("stablehlo.all_reduce"),
        "manual_computation": text.count("sdy.manual_computation"),
        "aliased_buffers": len(p.abi.aliases),
        "executables": {k: {"jaxlib": v.jaxlib, "platform_version": v.platform_version,
                            "fingerprint": v.fingerprint} for k, v in m.executables.items()},
        "config": m.config,
    }


def _itemsize(v: VarSpec) -> int:
    from sgdgen.frontend.spec import numpy_dtype

    return numpy_dtype(v.dtype).itemsize
