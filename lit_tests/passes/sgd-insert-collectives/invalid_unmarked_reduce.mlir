// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-insert-collectives)' 2>&1 | filecheck %s

/// BUG (sgd-insert-collectives): a reduction to a scalar of a SHARDED value that is not
/// a norm partial (no `sgdgen.norm_partial`) is accepted and left as a local sum over
/// the device's shard, with no collective, and the result is returned under a
/// replicated sharding (`[]`). Observed: exit 0 and
///   %1 = stablehlo.reduce(%arg1 init: %cst) ... : (tensor<8x4xf32>, tensor<f32>) -> tensor<f32>
///   sdy.return %1
/// i.e. each device returns the sum of its own quarter of the tensor while claiming
/// the global sum: a silent miscompile. Expected: a diagnostic at the reduce (or,
/// alternatively, a reduction made global with a collective; this test expects the
/// diagnostic, as for every other op the pass does not handle). Remove the XFAIL line
/// once fixed.

/// Only norm partials are reduced across devices; any other reduction of a sharded
/// value cannot be partitioned locally.
// CHECK: reduce_op: error: sgd-insert-collectives:
module @unmarked_reduce_of_sharded_value {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %0 = stablehlo.reduce(%arg0 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32> loc("reduce_op")
    return %0 : tensor<f32>
  }
}
