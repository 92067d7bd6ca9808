// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-update)' | filecheck %s

/// A flat bucket's gradient built from its members' gradients (g = concatenate of 1-D float32
/// pieces, a 2-D member reshaped first) is passed as the pieces: operands g_1..g_3, w, m, lr;
/// the flags' 7th word counts the pieces (3); each alias's operand index moves past them (w at
/// 3, m at 4); the concatenate, read by nothing else, is gone (the reshape stays: the call reads it).
// CHECK-LABEL: module @pieces
// CHECK:         %[[F:.*]] = stablehlo.reshape %arg2 : (tensor<256x128xf32>) -> tensor<32768xf32>
// CHECK-NOT:     stablehlo.concatenate
// CHECK:         %[[U:.*]]:2 = stablehlo.custom_call @sgdgen_sgd_update_f32(%[[F]], %arg3, %arg4, %arg0, %arg1, %arg5)
// CHECK-SAME:      mhlo.backend_config = {constants = array<i64: 0, 1063675494, 0, 0, 0, 0>, flags = array<i64: 0, 0, 0, 0, 0, 0, 3>}
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 3, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 4, operand_tuple_indices = []>]
// CHECK-SAME:      : (tensor<32768xf32>, tensor<30000xf32>, tensor<2768xf32>, tensor<65536xf32>, tensor<65536xf32>, tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>)
// CHECK-NOT:     stablehlo.concatenate
// CHECK-NOT:     stablehlo.multiply
// CHECK:         return %[[U]]#0, %[[U]]#1
module @pieces attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %g0: tensor<256x128xf32>, %g1: tensor<30000xf32>, %g2: tensor<2768xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>) {
    %f0 = stablehlo.reshape %g0 : (tensor<256x128xf32>) -> tensor<32768xf32>
    %g = stablehlo.concatenate %f0, %g1, %g2, dim = 0 : (tensor<32768xf32>, tensor<30000xf32>, tensor<2768xf32>) -> tensor<65536xf32>
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

/// The benchmark's update (global clip, decay, Nesterov, EMA) over two pieces, one of them a
/// single element: the scalars follow w, m, a; three aliases, at operand indices 2, 3 and 4.
// CHECK-LABEL: module @full_pieces
// CHECK-NOT:     stablehlo.concatenate
// CHECK:         %[[U:.*]]:3 = stablehlo.custom_call @sgdgen_sgd_update_f32(%arg3, %arg4, %arg0, %arg1, %arg2, %arg5, %arg6)
// CHECK-SAME:      flags = array<i64: 1, 1, 1, 1, 0, 0, 2>
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 2, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 3, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [2], operand_index = 4, operand_tuple_indices = []>]
// CHECK-SAME:      : (tensor<65535xf32>, tensor<1xf32>, tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>, tensor<f32>, tensor<f32>)
// CHECK-NOT:     stablehlo.concatenate
// CHECK:         return %[[U]]#0, %[[U]]#1, %[[U]]#2
module @full_pieces attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %a: tensor<65536xf32> {tf.aliasing_output = 2 : i32}, %g0: tensor<65535xf32>, %g1: tensor<1xf32>, %lr: tensor<f32>, %scale: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>) {
    %g = stablehlo.concatenate %g0, %g1, dim = 0 : (tensor<65535xf32>, tensor<1xf32>) -> tensor<65536xf32>
    %wd = stablehlo.constant dense<4.000000e-03> : tensor<65536xf32>
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %keep = stablehlo.constant dense<9.900000e-01> : tensor<65536xf32>
    %take = stablehlo.constant dense<0.00999999977> : tensor<65536xf32>
    %s_b = stablehlo.broadcast_in_dim %scale, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %gc = stablehlo.multiply %g, %s_b : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %w_wd = stablehlo.multiply %w, %wd : tensor<65536xf32>
    %decay = stablehlo.multiply %w_wd, %lr_b : tensor<65536xf32>
    %w1 = stablehlo.subtract %w, %decay : tensor<65536xf32>
    %neg = stablehlo.negate %gc : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %look = stablehlo.multiply %m_new, %mom : tensor<65536xf32>
    %delta = stablehlo.add %step, %look : tensor<65536xf32>
    %w_new = stablehlo.add %w1, %delta : tensor<65536xf32>
    %old = stablehlo.multiply %keep, %a : tensor<65536xf32>
    %new = stablehlo.multiply %take, %w_new : tensor<65536xf32>
    %a_new = stablehlo.add %old, %new : tensor<65536xf32>
    return %w_new, %m_new, %a_new : tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// A concatenate something else also reads (here returned as well) stays for that reader; the
/// call still takes the pieces, not the concatenate.
// CHECK-LABEL: module @concat_also_returned
// CHECK:         %[[G:.*]] = stablehlo.concatenate %arg2, %arg3, dim = 0
// CHECK:         %[[U:.*]]:2 = stablehlo.custom_call @sgdgen_sgd_update_f32(%arg2, %arg3, %arg0, %arg1, %arg4)
// CHECK-SAME:      flags = array<i64: 0, 0, 0, 0, 0, 0, 2>
// CHECK-SAME:      operand_index = 2
// CHECK-SAME:      operand_index = 3
// CHECK:         return %[[U]]#0, %[[U]]#1, %[[G]]
module @concat_also_returned attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %g0: tensor<40000xf32>, %g1: tensor<25536xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>) {
    %g = stablehlo.concatenate %g0, %g1, dim = 0 : (tensor<40000xf32>, tensor<25536xf32>) -> tensor<65536xf32>
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

/// A concatenate of 2-D pieces (along dim 0, a 2-D result) is not a bucket's gradient: the call
/// takes the concatenate's result as its one g, with six flags and the unshifted aliases.
// CHECK-LABEL: module @two_d_pieces
// CHECK:         %[[G:.*]] = stablehlo.concatenate %arg2, %arg3, dim = 0 : (tensor<100x256xf32>, tensor<156x256xf32>) -> tensor<256x256xf32>
// CHECK:         %[[U:.*]]:2 = stablehlo.custom_call @sgdgen_sgd_update_f32(%[[G]], %arg0, %arg1, %arg4)
// CHECK-SAME:      flags = array<i64: 0, 0, 0, 0, 0, 0>}
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 1, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 2, operand_tuple_indices = []>]
// CHECK:         return %[[U]]#0, %[[U]]#1
module @two_d_pieces attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<256x256xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<256x256xf32> {tf.aliasing_output = 1 : i32}, %g0: tensor<100x256xf32>, %g1: tensor<156x256xf32>, %lr: tensor<f32>) -> (tensor<256x256xf32>, tensor<256x256xf32>) {
    %g = stablehlo.concatenate %g0, %g1, dim = 0 : (tensor<100x256xf32>, tensor<156x256xf32>) -> tensor<256x256xf32>
    %mom = stablehlo.constant dense<0.899999976> : tensor<256x256xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<256x256xf32>
    %neg = stablehlo.negate %g : tensor<256x256xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<256x256xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<256x256xf32>
    %m_new = stablehlo.add %step, %mm : tensor<256x256xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<256x256xf32>
    return %w_new, %m_new : tensor<256x256xf32>, tensor<256x256xf32>
  }
}
