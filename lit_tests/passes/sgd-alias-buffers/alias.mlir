// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-alias-buffers)' | filecheck %s

/// The first `sgdgen.state_count` arguments of @main are the step's state, and result k
/// is the new value of argument k: each such argument gets `tf.aliasing_output = k : i32`
/// (kept beside its sdy.sharding) so that XLA updates the buffer in place. Arguments
/// after the state (gradients, learning rate) are not aliased. The body is untouched.

/// Three state arguments (iterations, a variable, its momentum), then a gradient and a
/// learning rate.
// CHECK-LABEL: module @aliases_the_state_arguments
// CHECK:         func.func public @main(
// CHECK-SAME:      %{{.*}}: tensor<i64> {sdy.sharding = #sdy.sharding<@mesh, []>, tf.aliasing_output = 0 : i32},
// CHECK-SAME:      %{{.*}}: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, tf.aliasing_output = 1 : i32},
// CHECK-SAME:      %{{.*}}: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, tf.aliasing_output = 2 : i32},
// CHECK-SAME:      %{{.*}}: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
// CHECK-SAME:      %{{.*}}: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>})
// CHECK-SAME:      -> (tensor<i64> {sdy.sharding = #sdy.sharding<@mesh, []>},
// CHECK-NOT:     tf.aliasing_output
// CHECK:         attributes {sgdgen.state_count = 3 : i64}
// CHECK-NEXT:      %[[C:.*]] = stablehlo.constant dense<1> : tensor<i64>
module @aliases_the_state_arguments {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%iterations: tensor<i64> {sdy.sharding = #sdy.sharding<@mesh, []>},
                         %w: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %m: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %g: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %lr: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>})
      -> (tensor<i64> {sdy.sharding = #sdy.sharding<@mesh, []>},
          tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
          tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      attributes {sgdgen.state_count = 3 : i64} {
    %one = stablehlo.constant dense<1> : tensor<i64>
    %next = stablehlo.add %iterations, %one : tensor<i64>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<8x16xf32>
    %step = stablehlo.multiply %g, %lr_b : tensor<8x16xf32>
    %new_m = stablehlo.add %m, %step : tensor<8x16xf32>
    %new_w = stablehlo.subtract %w, %new_m : tensor<8x16xf32>
    return %next, %new_w, %new_m : tensor<i64>, tensor<8x16xf32>, tensor<8x16xf32>
  }
}

// -----

/// Arguments without any attribute dictionary (no sdy.sharding on either side) are
/// aliased too; the pass creates the dictionaries.
// CHECK-LABEL: module @aliases_arguments_without_attributes
// CHECK:         func.func public @main(%{{.*}}: tensor<4xf32> {tf.aliasing_output = 0 : i32}, %{{.*}}: tensor<4xf32> {tf.aliasing_output = 1 : i32}, %{{.*}}: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>)
module @aliases_arguments_without_attributes {
  func.func public @main(%w: tensor<4xf32>, %m: tensor<4xf32>, %g: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>)
      attributes {sgdgen.state_count = 2 : i64} {
    %new_m = stablehlo.add %m, %g : tensor<4xf32>
    %new_w = stablehlo.subtract %w, %new_m : tensor<4xf32>
    return %new_w, %new_m : tensor<4xf32>, tensor<4xf32>
  }
}

// -----

/// state_count = 0 (nothing to update in place) aliases nothing.
// CHECK-LABEL: module @no_state
// CHECK-NOT:     tf.aliasing_output
// CHECK:         return
module @no_state {
  func.func public @main(%g: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.state_count = 0 : i64} {
    %n = stablehlo.negate %g : tensor<4xf32>
    return %n : tensor<4xf32>
  }
}

// -----

/// An argument that already carries the right alias (the pass run twice) keeps it.
// CHECK-LABEL: module @already_aliased_idempotent
// CHECK:         func.func public @main(%{{.*}}: tensor<4xf32> {tf.aliasing_output = 0 : i32}, %{{.*}}: tensor<4xf32>)
module @already_aliased_idempotent {
  func.func public @main(%w: tensor<4xf32> {tf.aliasing_output = 0 : i32}, %g: tensor<4xf32>) -> tensor<4xf32>
      attributes {sgdgen.state_count = 1 : i64} {
    %new_w = stablehlo.subtract %w, %g : tensor<4xf32>
    return %new_w : tensor<4xf32>
  }
}

// -----

/// The pass also runs on the partitioned (stage-1) form: it only reads @main's signature.
// CHECK-LABEL: module @partitioned_main
// CHECK:         func.func public @main(%{{.*}}: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>, tf.aliasing_output = 0 : i32}, %{{.*}}: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>})
// CHECK-NEXT:      sdy.manual_computation
module @partitioned_main {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%w: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>},
                         %g: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>})
      -> (tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}) attributes {sgdgen.state_count = 1 : i64} {
    %0 = sdy.manual_computation(%w, %g) in_shardings=[<@mesh, [{"model"}]>, <@mesh, [{"model"}]>] out_shardings=[<@mesh, [{"model"}]>] manual_axes={"model"} (%lw: tensor<4xf32>, %lg: tensor<4xf32>) {
      %1 = stablehlo.subtract %lw, %lg : tensor<4xf32>
      sdy.return %1 : tensor<4xf32>
    } : (tensor<16xf32>, tensor<16xf32>) -> tensor<16xf32>
    return %0 : tensor<16xf32>
  }
}
