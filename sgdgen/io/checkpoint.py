"""Checkpoints of the optimizer's state through orbax-checkpoint.

    sgdgen.io.checkpoint.save(directory, step, tree, meta)       # one step directory per call
    tree, meta = sgdgen.io.checkpoint.restore(directory, step, abstract_tree)

A checkpoint is two orbax items in `directory/<step>/`:

  `sgdgen_state`  the arrays as one pytree {"iterations", "variables", "momenta", "averages"}
                  (lists in the optimizer's variable order), written by orbax's StandardSave
                  with each array's sharding, so that every process writes its own shards;
  `sgdgen_meta`   JSON: format version, the optimizer's `get_config()`, and per variable its
                  name, shape, dtype and layout (what a restore is checked against).

Atomicity is orbax's: a step is written into `<step>.orbax-checkpoint-tmp-*` and renamed to
`<step>` only once complete, so a writer killed mid-save leaves the previous steps readable
and the partial one invisible to `latest_step` (tests/test_checkpoint.py kills a writer).

A restore reads into *target* shardings (any mesh or layout: orbax reads the slices each
device needs), so values are bit-identical whatever the mesh was at save time.

Users with their own `orbax.checkpoint.CheckpointManager` pass it instead of a directory;
its other items (the model's, a data iterator's) are saved in the same step through
`extra` (a dict of `ocp.args`), and `save_args` / `restore_args` give sgdgen's two items for
a `ocp.args.Composite` the user builds themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sgdgen.errors import ArtifactError, ConfigError
from sgdgen.frontend.spec import Layout

STATE_ITEM = "sgdgen_state"
META_ITEM = "sgdgen_meta"
FORMAT = "sgdgen-checkpoint"
VERSION = 1
STATE_KEYS = ("iterations", "variables", "momenta", "averages")


def state_tree(iterations: Any, variables: Sequence[Any], momenta: Sequence[Any],
               averages: Sequence[Any], skipped: Any = None) -> dict[str, Any]:
    """The checkpointed pytree: plain dict and lists (orbax's tree handling, no custom nodes);
    `skipped` (the skipped-steps counter of `skip_nonfinite`) only when the optimizer keeps one."""
    tree = {"iterations": iterations, "variables": list(variables), "momenta": list(momenta),
            "averages": list(averages)}
    if skipped is not None:
        tree["skipped"] = skipped
    return tree


def spec(name: str, shape: Sequence[int], dtype: Any, layout: Layout) -> dict[str, Any]:
    """One variable as the metadata records it (JSON)."""
    return {"name": name, "shape": [int(n) for n in shape], "dtype": str(dtype), "layout": layout.sharding_specs}


def metadata(config: Mapping[str, Any], specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON item: `config` is `get_config()`, `specs` one {name, shape, dtype, layout} per variable."""
    return {"format": FORMAT, "version": VERSION, "config": dict(config), "variables": [dict(s) for s in specs]}


def save_args(tree: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """sgdgen's two items as orbax save args, for `ocp.args.Composite(**save_args(...), **yours)`."""
    import orbax.checkpoint as ocp

    return {STATE_ITEM: ocp.args.StandardSave(dict(tree)), META_ITEM: ocp.args.JsonSave(dict(meta))}


def restore_args(abstract: Mapping[str, Any]) -> dict[str, Any]:
    """sgdgen's two items as orbax restore args; `abstract` holds `jax.ShapeDtypeStruct`s with
    the target shardings (the layout to restore into, not the one saved)."""
    import orbax.checkpoint as ocp

    return {STATE_ITEM: ocp.args.StandardRestore(dict(abstract)), META_ITEM: ocp.args.JsonRestore()}


def _manager(target: Any) -> tuple[Any, bool]:
    """(a CheckpointManager, whether this module created it and must close it)."""
    import orbax.checkpoint as ocp

    if isinstance(target, ocp.CheckpointManager):
        return target, False
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"checkpoint target must be a directory (str or Path) or an "
                        f"orbax.checkpoint.CheckpointManager, got {type(target).__name__}")
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(target).absolute(), options=options), True


def save(target: Any, step: int, tree: Mapping[str, Any], meta: Mapping[str, Any], *,
         extra: Mapping[str, Any] | None = None) -> int:
    """Writes checkpoint `step` (atomically: a temporary directory renamed when complete) and
    waits until it is on disk. Every process of a multi-process run must call it. Returns `step`."""
    import orbax.checkpoint as ocp

    step = int(step)
    clash = set(extra or ()) & {STATE_ITEM, META_ITEM}
    if clash:
        raise ConfigError(f"extra checkpoint item {sorted(clash)[0]!r} is sgdgen's own; name your item differently")
    manager, owned = _manager(target)
    try:
        if step in manager.all_steps():
            raise ArtifactError(f"checkpoint step {step} already exists in {manager.directory}; "
                                "save under a new step (orbax never overwrites a step)")
        args = ocp.args.Composite(**save_args(tree, meta), **dict(extra or {}))
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
    finally:
        if owned:
            manager.close()
    return step


def latest_step(target: Any) -> int | None:
    """The newest complete step in a directory or manager (partial writes are not steps)."""
    manager, owned = _manager(target)
    try:
        return manager.latest_step()
    finally:
        if owned:
            manager.close()


def _resolve(manager: Any, step: int | None) -> int:
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise ArtifactError(f"no complete checkpoint in {manager.directory}; save one first "
                                "(a partial write, e.g. of a killed process, does not count)")
    elif int(step) not in manager.all_steps():
        raise ArtifactError(f"checkpoint step {step} is not in {manager.directory}; it holds steps "
                            f"{sorted(manager.all_steps())}")
    return int(step)


def read_metadata(target: Any, step: int | None = None) -> dict[str, Any]:
    """The JSON item of a step (the newest by default): config and variables, no arrays read.
    `SGD.from_config(read_metadata(d)["config"])` recreates the optimizer that wrote it."""
    import orbax.checkpoint as ocp

    manager, owned = _manager(target)
    try:
        step = _resolve(manager, step)
        meta = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
    finally:
        if owned:
            manager.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"step {step} in {manager.directory} is not an sgdgen checkpoint (no {META_ITEM!r} "
                            "item of format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"checkpoint step {step} has format version {meta.get('version')}; this sgdgen reads "
                            f"version {VERSION}")
    return meta


def _json(value: Any) -> Any:
    """A value as it reads back from JSON (tuples become lists)."""
    return [_json(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_compatible(meta: Mapping[str, Any], specs: Sequence[Mapping[str, Any]], use_ema: bool) -> None:
    """Raises naming the first variable whose name, shape or dtype differs from the checkpoint's
    (layouts may differ: a restore reshards). Nothing is read or changed before this passes."""
    saved = list(meta["variables"])
    names = [s["name"] for s in saved]
    for k, want in enumerate(specs):
        if want["name"] not in names:
            raise ArtifactError(f"variable {want['name']!r} is not in the checkpoint, which holds {names}; "
                                "restore into an optimizer built on the variables that were saved")
        got = saved[names.index(want["name"])]
        if names.index(want["name"]) != k:
            raise ArtifactError(f"variable {want['name']!r} is at position {k} in the optimizer but "
                                f"{names.index(want['name'])} in the checkpoint; build the optimizer with the "
                                f"saved order {names}")
        for field in ("shape", "dtype"):
            if _json(got[field]) != _json(want[field]):
                raise ArtifactError(f"variable {want['name']!r} has {field} {want[field]} but the checkpoint "
                                    f"holds {got[field]}; restore into a variable of the saved {field}")
    if len(saved) != len(specs):
        extra = names[len(specs):]
        raise ArtifactError(f"the checkpoint holds variables {extra} that the optimizer does not have; build it on "
                            f"all of {names}")
    saved_ema = bool(meta["config"].get("use_ema"))
    if saved_ema != bool(use_ema):
        raise ConfigError(f"use_ema: the checkpoint was saved with use_ema={saved_ema} and this optimizer has "
                          f"use_ema={bool(use_ema)}; the EMA averages would be {'lost' if saved_ema else 'missing'}. "
                          "Create the optimizer with the saved config (read_metadata(...)['config'])")


def restore(target: Any, step: int | None, abstract: Mapping[str, Any], *,
            check: Any = None, extra: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any],
                                                                                dict[str, Any]]:
    """Reads step `step` (None: the newest complete one) into `abstract`'s shapes, dtypes and
    shardings. `check(meta)` runs on the metadata before any array is read (raise to refuse).
    Returns (state tree, metadata, extra items restored with `extra`'s args)."""
    import jax
    import orbax.checkpoint as ocp

    manager, owned = _manager(target)
    try:
        step = _resolve(manager, step)
        meta = read_metadata(manager, step)
        if check is not None:
            check(meta)
        # The skipped-steps counter is saved only by `skip_nonfinite` optimizers: read what the
        # checkpoint holds (a counter it has and the target lacks is read and dropped).
        abstract = dict(abstract)
        saved_skipped = bool(meta.get("config", {}).get("skip_nonfinite", False))
        wanted_skipped = "skipped" in abstract
        if saved_skipped and not wanted_skipped:
            abstract["skipped"] = abstract["iterations"]
        elif wanted_skipped and not saved_skipped:
            del abstract["skipped"]
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)}, **dict(extra or {}))
        with jax.enable_x64(True):  # iterations is int64 (tf_keras); without x64 JAX would narrow it
            out = manager.restore(step, args=args)
    finally:
        if owned:
            manager.close()
    tree = dict(out[STATE_ITEM])
    if not wanted_skipped:
        tree.pop("skipped", None)
    return tree, meta, {k: out[k] for k in (extra or {})}


__all__ = ["META_ITEM", "STATE_ITEM", "check_compatible", "latest_step", "metadata", "read_metadata", "restore",
           "restore_args", "save", "save_args", "spec", "state_tree"]
