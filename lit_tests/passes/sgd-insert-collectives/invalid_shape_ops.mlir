// RUN: not sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' 2>&1 | filecheck %s

/// BUG (sgd-insert-collectives): stablehlo.reshape, slice and concatenate are in the
/// pass's SCALAR_ONLY set (meant for sgd-fuse-step's packing of scalar partials), but
/// nothing checks that their operands are unsharded, so on a sharded value the pass
/// re-types the operand to its local shape, keeps the global result type, and leaves
/// invalid IR that only the verifier after the pass catches. Observed, for the two cases
/// below:
///   reshape_op: error: number of output elements (128) doesn't match expected number of elements (32)
///   slice_op: error: limit index 8 is larger than dimension size 4 in dimension 1
///             error: 'stablehlo.slice' op failed to infer returned types
/// Expected: the pass's own diagnostic at the op, like for transpose ("cannot partition
/// stablehlo.reshape: ..."). Remove the XFAIL line once fixed.

/// Reshape of a sharded value: not partitioned, reported by the pass at the op.
// CHECK: reshape_op: error: sgd-insert-collectives: cannot partition stablehlo.reshape
module @reshape_of_sharded_value {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<128xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>}) {
    %0 = stablehlo.reshape %arg0 : (tensor<8x16xf32>) -> tensor<128xf32> loc("reshape_op")
    return %0 : tensor<128xf32>
  }
}

// -----

/// Slice of a sharded value: likewise.
// CHECK: slice_op: error: sgd-insert-collectives: cannot partition stablehlo.slice
module @slice_of_sharded_value {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}) {
    %0 = stablehlo.slice %arg0 [0:8, 0:8] : (tensor<8x16xf32>) -> tensor<8x8xf32> loc("slice_op")
    return %0 : tensor<8x8xf32>
  }
}
