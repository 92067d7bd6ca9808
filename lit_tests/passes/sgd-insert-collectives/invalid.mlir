// RUN: not sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' 2>&1 | filecheck %s

/// Input the pass cannot partition is reported as an MLIR diagnostic naming the pass
/// (never a traceback or an "internal error"), and sgdgen-opt exits non-zero. Ops and
/// functions carry named locations (loc("...")), so each CHECK also pins the op the
/// diagnostic points at.

/// No sdy.mesh: the device mesh is unknown. Reported at the module.
// CHECK: no_mesh: error: sgd-insert-collectives: the module has no sdy.mesh; declare the device mesh (sdy.mesh @mesh = <[...]>)
module @no_mesh {
  func.func public @main(%arg0: tensor<8x16xf32>) -> tensor<8x16xf32> {
    return %arg0 : tensor<8x16xf32>
  }
} loc("no_mesh")

// -----

/// An argument without sdy.sharding: its layout (and so its local shape) is unknown.
// CHECK: missing_sharding: error: sgd-insert-collectives: argument 1 of @main has no sdy.sharding; give every argument and result a #sdy.sharding (sgdgen emit does)
module @argument_without_sharding {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}, %arg1: tensor<8x16xf32>)
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    return %arg0 : tensor<8x16xf32>
  } loc("missing_sharding")
}

// -----

/// A sharding that names an axis @mesh does not have. Shardy's own verifier rejects it
/// when the module is parsed, before the pass runs.
// CHECK: unknown_axis: error: 'func.func' op arg 0 - unknown axis name: "data"
module @unknown_axis {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"data"}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}) {
    return %arg0 : tensor<8x16xf32>
  } loc("unknown_axis")
}

// -----

/// A dimension that the axes do not divide: 6 columns over "model"=4.
// CHECK: not_divisible: error: sgd-insert-collectives: argument 0: dimension 1 of size 6 is not divisible by 4 (axes ['model'])
module @dimension_not_divisible {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    return %arg0 : tensor<8x6xf32>
  } loc("not_divisible")
}

// -----

/// Two axes on one dimension divide it by their product: 2 * 4 = 8 does not divide 12.
// CHECK: not_divisible_two_axes: error: sgd-insert-collectives: argument 0: dimension 0 of size 12 is not divisible by 8
module @dimension_not_divisible_two_axes {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<12xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch", "model"}]>})
      -> (tensor<12xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch", "model"}]>}) {
    return %arg0 : tensor<12xf32>
  } loc("not_divisible_two_axes")
}

// -----

/// Two differently sharded arguments combined elementwise would need a reshard. (The
/// pass docstring says this is an error at the op; it is reported at @main, which the
/// loc("mixed_layouts") on @main shows. Only the message is pinned here.)
// CHECK: error: sgd-insert-collectives: arguments 0 and 1 are combined elementwise but sharded differently
// CHECK-SAME: the step does not reshard
module @combined_elementwise_different_shardings {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %arg1: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %0 = stablehlo.add %arg0, %arg1 : tensor<8x16xf32>
    return %0 : tensor<8x16xf32>
  } loc("mixed_layouts")
}

// -----

/// A result declared with a sharding other than that of the value returned.
// CHECK: returned: error: sgd-insert-collectives: result 0 is declared
// CHECK-SAME: but the value returned is laid out
// CHECK-SAME: the step does not reshard
module @result_sharding_mismatch {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>}) {
    %0 = stablehlo.negate %arg0 : tensor<8x16xf32>
    return %0 : tensor<8x16xf32> loc("returned")
  }
}

// -----

/// The step is elementwise apart from its norm reductions: a transpose of a sharded
/// value is not partitioned. Reported at the op.
// CHECK: transpose_op: error: sgd-insert-collectives: cannot partition stablehlo.transpose: the step is elementwise apart from its norm reductions
module @cannot_partition_transpose {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<16x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}) {
    %0 = stablehlo.transpose %arg0, dims = [1, 0] : (tensor<8x16xf32>) -> tensor<16x8xf32> loc("transpose_op")
    return %0 : tensor<16x8xf32>
  }
}

// -----

/// Nor a dot_general.
// CHECK: dot_op: error: sgd-insert-collectives: cannot partition stablehlo.dot_general: the step is elementwise apart from its norm reductions
module @cannot_partition_dot_general {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}) {
    %0 = stablehlo.dot_general %arg0, %arg0, contracting_dims = [1] x [1] : (tensor<8x16xf32>, tensor<8x16xf32>) -> tensor<8x8xf32> loc("dot_op")
    return %0 : tensor<8x8xf32>
  }
}

// -----

/// Only broadcasts of scalars take a local shape.
// CHECK: broadcast_op: error: sgd-insert-collectives: can only partition broadcasts of scalars
module @cannot_partition_broadcast_of_vector {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %arg1: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %0 = stablehlo.broadcast_in_dim %arg1, dims = [1] : (tensor<16xf32>) -> tensor<8x16xf32> loc("broadcast_op")
    %1 = stablehlo.add %arg0, %0 : tensor<8x16xf32>
    return %1 : tensor<8x16xf32>
  }
}

// -----

/// A non-splat constant cannot be cut into per-device pieces by re-typing it.
// CHECK: iota_constant: error: sgd-insert-collectives: cannot shard a non-splat constant
module @cannot_shard_non_splat_constant {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%arg0: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>})
      -> (tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}) {
    %c = stablehlo.constant dense<[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]> : tensor<8xf32> loc("iota_constant")
    %0 = stablehlo.add %arg0, %c : tensor<8xf32>
    return %0 : tensor<8xf32>
  }
}

// -----

/// A module that was not fused: @main still calls its stage functions.
// CHECK: leftover_call: error: sgd-insert-collectives: @main still calls stage functions; run sgd-fuse-step first
module @not_fused {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func private @negate_8x16xf32(%g: tensor<8x16xf32>) -> tensor<8x16xf32> attributes {sgdgen.stage = "update_plain"} {
    %0 = stablehlo.negate %g : tensor<8x16xf32>
    return %0 : tensor<8x16xf32>
  }
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %0 = func.call @negate_8x16xf32(%arg0) : (tensor<8x16xf32>) -> tensor<8x16xf32> loc("leftover_call")
    return %0 : tensor<8x16xf32>
  }
}

// -----

/// Norm partials that sgd-fuse-step did not join into one `sgdgen.norms` value.
// CHECK: unjoined_partial: error: sgd-insert-collectives: norm partials are not joined into one sgdgen.norms value; run sgd-fuse-step first
module @partials_not_joined {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%arg0: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sq = stablehlo.multiply %arg0, %arg0 : tensor<8xf32>
    %p = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<8xf32>, tensor<f32>) -> tensor<f32> loc("unjoined_partial")
    return %p : tensor<f32>
  }
}

// -----

/// Already partitioned input (stage 1): the pass runs once.
// CHECK: partitioned_main: error: sgd-insert-collectives: @main is already partitioned (it holds an sdy.manual_computation)
module @already_partitioned {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %0 = sdy.manual_computation(%arg0) in_shardings=[<@mesh, [{}, {"model"}]>] out_shardings=[<@mesh, [{}, {"model"}]>] manual_axes={"batch", "model"} (%arg1: tensor<8x4xf32>) {
      %1 = stablehlo.negate %arg1 : tensor<8x4xf32>
      sdy.return %1 : tensor<8x4xf32>
    } : (tensor<8x16xf32>) -> tensor<8x16xf32>
    return %0 : tensor<8x16xf32>
  } loc("partitioned_main")
}

// -----

/// On one device nothing is partitioned, but the checks are those of the partitioned case: a
/// result laid out differently from the value returned is still refused (at the return).
// CHECK: one_device_invalid: error: sgd-insert-collectives: result 0 is declared [('model',), ()] but the value returned is laid out [(), ()]
module @one_device_invalid {
  sdy.mesh @mesh = <["model"=1]>
  func.func public @main(%w: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>})
      -> (tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}) {
    return %w : tensor<8x4xf32> loc("one_device_invalid")
  }
}

// -----

/// Two meshes: which one the step runs on is ambiguous. Reported at the second.
// CHECK: second_mesh: error: sgd-insert-collectives: expects exactly one sdy.mesh, found 2; partition a module with one mesh
module @two_meshes {
  sdy.mesh @mesh = <["model"=2]>
  sdy.mesh @other = <["model"=4]> loc("second_mesh")
  func.func public @main(%w: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>}) {
    return %w : tensor<8xf32>
  }
}
