// RUN: not sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' 2>&1 | filecheck %s

/// Unreduced axes are taken on gradient arguments only (after sgdgen.state_count), and only
/// over axes their variable is replicated on; anything else is a diagnostic naming the
/// argument, before the module changes.

/// A state argument (the variable, argument 0) declared unreduced.
// CHECK: unreduced_state: error: sgd-insert-collectives: argument 0 has unreduced axes ['batch']; only gradient arguments may arrive unreduced (a partial sum per device): give it a reduced sharding
module @unreduced_state {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}], unreduced={"batch"}>},
                         %arg1: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) attributes {sgdgen.state_count = 1 : i64} {
    %0 = stablehlo.subtract %arg0, %arg1 : tensor<8x16xf32>
    return %0 : tensor<8x16xf32>
  } loc("unreduced_state")
}

// -----

/// A result declared unreduced.
// CHECK: unreduced_result: error: sgd-insert-collectives: result 0 has unreduced axes ['batch']; only gradient arguments may arrive unreduced
module @unreduced_result {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %arg1: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}], unreduced={"batch"}>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}], unreduced={"batch"}>}) attributes {sgdgen.state_count = 1 : i64} {
    %0 = stablehlo.subtract %arg0, %arg1 : tensor<8x16xf32>
    return %0 : tensor<8x16xf32>
  } loc("unreduced_result")
}

// -----

/// A gradient unreduced over "batch", an axis its variable is sharded on.
// CHECK: unreduced_on_sharded_axis: error: sgd-insert-collectives: argument 1 (a gradient) arrives unreduced over ['batch'], but argument 0 (its variable) is sharded on it ([('batch',), ('model',)]): a gradient is a partial sum only over axes its variable is replicated on
module @unreduced_on_sharded_axis {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>},
                         %arg1: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}], unreduced={"batch"}>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>}) attributes {sgdgen.state_count = 1 : i64} {
    %0 = stablehlo.subtract %arg0, %arg1 : tensor<8x16xf32>
    return %0 : tensor<8x16xf32>
  } loc("unreduced_on_sharded_axis")
}
