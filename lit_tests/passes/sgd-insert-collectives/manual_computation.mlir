// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// The body of @main moves into one sdy.manual_computation over EVERY mesh axis, whose
/// in/out shardings are @main's argument/result shardings. Inside, each value has its
/// local (per-device) shape: a dimension sharded over axes of total size k is divided
/// by k. @main's own signature keeps the global types.

/// 8x16 sharded on "model" (4) of a batch=2,model=4 mesh: 8x4 per device; scalars stay.
// CHECK-LABEL: module @one_axis_one_dim
// CHECK:         func.func public @main(%[[W:.*]]: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}, %[[G:.*]]: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}, %[[LR:.*]]: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
// CHECK-NEXT:      %[[MC:.*]] = sdy.manual_computation(%[[W]], %[[G]], %[[LR]])
// CHECK-SAME:        in_shardings=[<@mesh, [{}, {"model"}]>, <@mesh, [{}, {"model"}]>, <@mesh, []>]
// CHECK-SAME:        out_shardings=[<@mesh, [{}, {"model"}]>]
// CHECK-SAME:        manual_axes={"batch", "model"}
// CHECK-SAME:        (%[[LW:.*]]: tensor<8x4xf32>, %[[LG:.*]]: tensor<8x4xf32>, %[[LLR:.*]]: tensor<f32>) {
// CHECK-NEXT:        %[[LR_B:.*]] = stablehlo.broadcast_in_dim %[[LLR]], dims = [] : (tensor<f32>) -> tensor<8x4xf32>
// CHECK-NEXT:        %[[STEP:.*]] = stablehlo.multiply %[[LG]], %[[LR_B]] : tensor<8x4xf32>
// CHECK-NEXT:        %[[NEW_W:.*]] = stablehlo.subtract %[[LW]], %[[STEP]] : tensor<8x4xf32>
// CHECK-NEXT:        sdy.return %[[NEW_W]] : tensor<8x4xf32>
// CHECK-NEXT:      } : (tensor<8x16xf32>, tensor<8x16xf32>, tensor<f32>) -> tensor<8x16xf32>
// CHECK-NEXT:      return %[[MC]] : tensor<8x16xf32>
// CHECK-NOT:     stablehlo.all_reduce
module @one_axis_one_dim {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%w: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %g: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %lr: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<8x16xf32>
    %step = stablehlo.multiply %g, %lr_b : tensor<8x16xf32>
    %new_w = stablehlo.subtract %w, %step : tensor<8x16xf32>
    return %new_w : tensor<8x16xf32>
  }
}

// -----

/// Two axes over two dimensions: 32x8 on [{"batch"}, {"model"}] is 16x2 per device.
// CHECK-LABEL: module @two_axes_two_dims
// CHECK:         sdy.manual_computation
// CHECK-SAME:        in_shardings=[<@mesh, [{"batch"}, {"model"}]>]
// CHECK-SAME:        out_shardings=[<@mesh, [{"batch"}, {"model"}]>]
// CHECK-SAME:        manual_axes={"batch", "model"}
// CHECK-SAME:        (%[[X:.*]]: tensor<16x2xf32>) {
// CHECK-NEXT:        %[[N:.*]] = stablehlo.negate %[[X]] : tensor<16x2xf32>
// CHECK-NEXT:        sdy.return %[[N]] : tensor<16x2xf32>
// CHECK-NEXT:      } : (tensor<32x8xf32>) -> tensor<32x8xf32>
module @two_axes_two_dims {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%x: tensor<32x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>})
      -> (tensor<32x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>}) {
    %n = stablehlo.negate %x : tensor<32x8xf32>
    return %n : tensor<32x8xf32>
  }
}

// -----

/// Two axes on ONE dimension: [{"batch", "model"}, {}] splits dimension 0 over all
/// 2 * 4 = 8 devices, so 8x16 is 1x16 per device.
// CHECK-LABEL: module @two_axes_one_dim
// CHECK:         sdy.manual_computation
// CHECK-SAME:        in_shardings=[<@mesh, [{"batch", "model"}, {}]>]
// CHECK-SAME:        manual_axes={"batch", "model"}
// CHECK-SAME:        (%[[X:.*]]: tensor<1x16xf32>) {
// CHECK-NEXT:        %[[N:.*]] = stablehlo.negate %[[X]] : tensor<1x16xf32>
// CHECK-NEXT:        sdy.return %[[N]] : tensor<1x16xf32>
// CHECK-NEXT:      } : (tensor<8x16xf32>) -> tensor<8x16xf32>
module @two_axes_one_dim {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%x: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch", "model"}, {}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch", "model"}, {}]>}) {
    %n = stablehlo.negate %x : tensor<8x16xf32>
    return %n : tensor<8x16xf32>
  }
}

// -----

/// Replicated values keep their global shape inside the manual computation; a mix of
/// layouts in one step (one per variable) is fine as long as they never meet; a result
/// that is an argument returned as is gets the local block argument.
// CHECK-LABEL: module @mixed_layouts
// CHECK:         %[[MC:.*]]:3 = sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"}
// CHECK-SAME:        (%[[R:.*]]: tensor<16xf32>, %[[S:.*]]: tensor<4x16xf32>, %[[I:.*]]: tensor<i64>) {
// CHECK-NEXT:        %[[NR:.*]] = stablehlo.negate %[[R]] : tensor<16xf32>
// CHECK-NEXT:        %[[NS:.*]] = stablehlo.negate %[[S]] : tensor<4x16xf32>
// CHECK-NEXT:        sdy.return %[[NR]], %[[NS]], %[[I]] : tensor<16xf32>, tensor<4x16xf32>, tensor<i64>
// CHECK-NEXT:      } : (tensor<16xf32>, tensor<8x16xf32>, tensor<i64>) -> (tensor<16xf32>, tensor<8x16xf32>, tensor<i64>)
// CHECK-NEXT:      return %[[MC]]#0, %[[MC]]#1, %[[MC]]#2 : tensor<16xf32>, tensor<8x16xf32>, tensor<i64>
module @mixed_layouts {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%r: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
                         %s: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>},
                         %i: tensor<i64> {sdy.sharding = #sdy.sharding<@mesh, []>})
      -> (tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
          tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>},
          tensor<i64> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %nr = stablehlo.negate %r : tensor<16xf32>
    %ns = stablehlo.negate %s : tensor<8x16xf32>
    return %nr, %ns, %i : tensor<16xf32>, tensor<8x16xf32>, tensor<i64>
  }
}

// -----

/// stablehlo.optimization_barrier passes each operand's layout to its result: a sharded
/// operand's result is re-typed to the local shape, a scalar stays a scalar.
// CHECK-LABEL: module @optimization_barrier_passes_layouts
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"} (%[[W:.*]]: tensor<8x4xf32>, %[[S:.*]]: tensor<f32>) {
// CHECK-NEXT:        %[[B:.*]]:2 = stablehlo.optimization_barrier %[[W]], %[[S]] : tensor<8x4xf32>, tensor<f32>
// CHECK-NEXT:        %[[S_B:.*]] = stablehlo.broadcast_in_dim %[[B]]#1, dims = [] : (tensor<f32>) -> tensor<8x4xf32>
// CHECK-NEXT:        %[[M:.*]] = stablehlo.multiply %[[B]]#0, %[[S_B]] : tensor<8x4xf32>
// CHECK-NEXT:        sdy.return %[[M]] : tensor<8x4xf32>
module @optimization_barrier_passes_layouts {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%w: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %s: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %b:2 = stablehlo.optimization_barrier %w, %s : tensor<8x16xf32>, tensor<f32>
    %s_b = stablehlo.broadcast_in_dim %b#1, dims = [] : (tensor<f32>) -> tensor<8x16xf32>
    %m = stablehlo.multiply %b#0, %s_b : tensor<8x16xf32>
    return %m : tensor<8x16xf32>
  }
}
