// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-update{min-elements=0})' | filecheck %s

/// A result is written in place over its operand only where that is free: the argument is donated
/// to that very result, or the operand is a temporary the call alone reads. Elsewhere the
/// kernel copies the operand into a fresh result first.

/// No tf.aliasing_output: no alias.
// CHECK-LABEL: module @not_donated
// CHECK:         stablehlo.custom_call @sgdgen_sgd_update_f32
// CHECK-NOT:     output_operand_aliases
// CHECK-SAME:    -> (tensor<65536xf32>, tensor<65536xf32>)
module @not_donated attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32>, %m: tensor<65536xf32>, %g: tensor<65536xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<65536xf32>
    return %w_new, %m_new : tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// Donated to another result (the weight's argument to a third result): no alias for it; the
/// momentum, donated to its own result, is still in place.
// CHECK-LABEL: module @donated_elsewhere
// CHECK:         stablehlo.custom_call @sgdgen_sgd_update_f32
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 2, operand_tuple_indices = []>]
module @donated_elsewhere attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 2 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %g: tensor<65536xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<65536xf32>
    return %w_new, %m_new, %g : tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// Inside a manual computation over every mesh axis the call takes the local shard (16384 of
/// 65536 elements, so min-elements=0 here), and donation is read through the computation's
/// operands and results to @main's.
// CHECK-LABEL: module @through_a_manual_computation
// CHECK:         sdy.manual_computation
// CHECK:         stablehlo.custom_call @sgdgen_sgd_update_f32
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 1, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 2, operand_tuple_indices = []>]
// CHECK-SAME:      : (tensor<16384xf32>, tensor<16384xf32>, tensor<16384xf32>, tensor<f32>) -> (tensor<16384xf32>, tensor<16384xf32>)
module @through_a_manual_computation attributes {mhlo.num_partitions = 8 : i32} {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%w: tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>, tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>, tf.aliasing_output = 1 : i32}, %g: tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}, %lr: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) -> (tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}, tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}) {
    %0:2 = sdy.manual_computation(%w, %m, %g, %lr) in_shardings=[<@mesh, [{"model"}]>, <@mesh, [{"model"}]>, <@mesh, [{"model"}]>, <@mesh, []>] out_shardings=[<@mesh, [{"model"}]>, <@mesh, [{"model"}]>] manual_axes={"batch", "model"} (%lw: tensor<16384xf32>, %lm: tensor<16384xf32>, %lg: tensor<16384xf32>, %llr: tensor<f32>) {
      %mom = stablehlo.constant dense<0.899999976> : tensor<16384xf32>
      %lr_b = stablehlo.broadcast_in_dim %llr, dims = [] : (tensor<f32>) -> tensor<16384xf32>
      %neg = stablehlo.negate %lg : tensor<16384xf32>
      %step = stablehlo.multiply %neg, %lr_b : tensor<16384xf32>
      %mm = stablehlo.multiply %lm, %mom : tensor<16384xf32>
      %m_new = stablehlo.add %step, %mm : tensor<16384xf32>
      %w_new = stablehlo.add %lw, %m_new : tensor<16384xf32>
      sdy.return %w_new, %m_new : tensor<16384xf32>, tensor<16384xf32>
    } : (tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>, tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>)
    return %0#0, %0#1 : tensor<65536xf32>, tensor<65536xf32>
  }
}
