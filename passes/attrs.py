"""The attribute names that the generator, the passes and the tests share, defined once.

The generator writes them (templates render them through `stage_attributes`), the passes
read and write them, tests look for them. Importing this module loads no MLIR bindings.
"""

from __future__ import annotations

#: On a stage function: which rule of SEMANTICS §4 it computes (one of STAGES).
STAGE = "sgdgen.stage"
#: On a learning-rate stage function: the schedule class it implements.
SCHEDULE = "sgdgen.schedule"
#: On an op inside @main (set by sgd-fuse-step): it produces one variable's share of a norm.
NORM_PARTIAL = "sgdgen.norm_partial"
#: On a norm partial op that counts non-finite gradient elements (skip_nonfinite; set by sgd-fuse-step
#: beside NORM_PARTIAL: masked and all-reduced as one, but summed apart from the norms).
NONFINITE = "sgdgen.nonfinite"
#: On the one op (set by sgd-fuse-step) whose value joins every norm partial of the step.
NORMS = "sgdgen.norms"
#: On an all_reduce of gradients that arrived unreduced (set by sgd-insert-collectives): the mesh
#: axes it sums over, an array of strings (sgd-shard-weight-update turns it into reduce_scatters).
UNREDUCED_AXES = "sgdgen.unreduced_axes"
#: On @main: its first N arguments are state, updated into results 0..N-1.
STATE_COUNT = "sgdgen.state_count"
#: On the module: the sgdgen version that generated it.
VERSION = "sgdgen.version"
#: Shardy's per-argument / per-result sharding.
SHARDING = "sdy.sharding"
#: XLA's input/output alias of an argument (set by sgd-alias-buffers).
ALIASING_OUTPUT = "tf.aliasing_output"

#: The stage a norm partial has: sgd-fuse-step tags what such a function computes.
NORM_PARTIAL_STAGE = "norm_partial"
#: The stage of a non-finite count: a norm partial too, tagged NONFINITE as well.
NONFINITE_STAGE = "nonfinite_count"
#: Every value of `sgdgen.stage` a template may set.
STAGES = frozenset({
    "learning_rate", "overwrite_due", NORM_PARTIAL_STAGE, NONFINITE_STAGE, "global_norm_scale", "global_clip_apply", "clip_norm",
    "clip_value", "weight_decay", "update_plain", "update_momentum", "update_nesterov", "ema", "ema_overwrite",
})


def stage_attributes(stage: str, schedule: str | None = None) -> str:
    """The attribute dictionary of a stage function, e.g. `{sgdgen.stage = "ema"}`."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {sorted(STAGES)}; add it to sgdgen.passes.attrs.STAGES")
    extra = f', {SCHEDULE} = "{schedule}"' if schedule is not None else ""
    return f'{{{STAGE} = "{stage}"{extra}}}'
