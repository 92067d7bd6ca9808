// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// Layouts reach values that are not arguments by propagation: a splat constant or a
/// broadcast of a scalar that meets a sharded value in an elementwise op takes that
/// value's layout and is re-typed to the local shape; the global-shape constant is gone.

// CHECK-LABEL: module @splat_constant_takes_local_shape
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"} (%[[M:.*]]: tensor<8x4xf32>) {
// CHECK-NOT:       tensor<8x16xf32>
// CHECK:           %[[ZERO:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<8x4xf32>
// CHECK-NOT:       tensor<8x16xf32>
// CHECK:           %[[KEEP:.*]] = stablehlo.multiply %[[M]], %[[ZERO]] : tensor<8x4xf32>
// CHECK-NEXT:      sdy.return %[[KEEP]] : tensor<8x4xf32>
module @splat_constant_takes_local_shape {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%m: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<8x16xf32>
    %keep = stablehlo.multiply %m, %zero : tensor<8x16xf32>
    return %keep : tensor<8x16xf32>
  }
}

// -----

/// A scalar constant stays a scalar; its broadcast to the variable's shape becomes a
/// broadcast to the local shape.
// CHECK-LABEL: module @broadcast_takes_local_shape
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"} (%[[W:.*]]: tensor<16x2xf32>) {
// CHECK:           %[[C:.*]] = stablehlo.constant dense<9.990000e-01> : tensor<f32>
// CHECK-NEXT:      %[[C_B:.*]] = stablehlo.broadcast_in_dim %[[C]], dims = [] : (tensor<f32>) -> tensor<16x2xf32>
// CHECK-NEXT:      %[[D:.*]] = stablehlo.multiply %[[W]], %[[C_B]] : tensor<16x2xf32>
// CHECK-NEXT:      sdy.return %[[D]] : tensor<16x2xf32>
module @broadcast_takes_local_shape {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%w: tensor<32x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>})
      -> (tensor<32x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>}) {
    %c = stablehlo.constant dense<0.999> : tensor<f32>
    %c_b = stablehlo.broadcast_in_dim %c, dims = [] : (tensor<f32>) -> tensor<32x8xf32>
    %d = stablehlo.multiply %w, %c_b : tensor<32x8xf32>
    return %d : tensor<32x8xf32>
  }
}

// -----

/// Layouts flow through chains: the constant meets the sharded value only through
/// an intermediate (the broadcast, then an add), and compare/select results (i1 too)
/// take the local shape.
// CHECK-LABEL: module @layout_flows_through_chains
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"} (%[[G:.*]]: tensor<1x16xf32>, %[[LR:.*]]: tensor<f32>) {
// CHECK:           %[[ONE:.*]] = stablehlo.constant dense<1.000000e+00> : tensor<1x16xf32>
// CHECK:           %[[LR_B:.*]] = stablehlo.broadcast_in_dim %[[LR]], dims = [] : (tensor<f32>) -> tensor<1x16xf32>
// CHECK-NEXT:      %[[LR1:.*]] = stablehlo.add %[[LR_B]], %[[ONE]] : tensor<1x16xf32>
// CHECK-NEXT:      %[[POS:.*]] = stablehlo.compare GT, %[[G]], %[[LR1]] : (tensor<1x16xf32>, tensor<1x16xf32>) -> tensor<1x16xi1>
// CHECK-NEXT:      %[[SEL:.*]] = stablehlo.select %[[POS]], %[[G]], %[[LR1]] : tensor<1x16xi1>, tensor<1x16xf32>
// CHECK-NEXT:      sdy.return %[[SEL]] : tensor<1x16xf32>
module @layout_flows_through_chains {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%g: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch", "model"}, {}]>},
                         %lr: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch", "model"}, {}]>}) {
    %one = stablehlo.constant dense<1.0> : tensor<8x16xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<8x16xf32>
    %lr1 = stablehlo.add %lr_b, %one : tensor<8x16xf32>
    %pos = stablehlo.compare GT, %g, %lr1 : (tensor<8x16xf32>, tensor<8x16xf32>) -> tensor<8x16xi1>
    %sel = stablehlo.select %pos, %g, %lr1 : tensor<8x16xi1>, tensor<8x16xf32>
    return %sel : tensor<8x16xf32>
  }
}

// -----

/// A constant that only meets replicated values keeps its (global = local) shape.
// CHECK-LABEL: module @replicated_constant_unchanged
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"} (%[[B:.*]]: tensor<16xf32>) {
// CHECK-NEXT:      %[[C:.*]] = stablehlo.constant dense<2.000000e+00> : tensor<16xf32>
// CHECK-NEXT:      %[[M:.*]] = stablehlo.multiply %[[B]], %[[C]] : tensor<16xf32>
// CHECK-NEXT:      sdy.return %[[M]] : tensor<16xf32>
module @replicated_constant_unchanged {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%b: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>}) {
    %c = stablehlo.constant dense<2.0> : tensor<16xf32>
    %m = stablehlo.multiply %b, %c : tensor<16xf32>
    return %m : tensor<16xf32>
  }
}
