// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-update)' | filecheck %s

/// A float32 variable's momentum update (m' = (-g)*lr + m*mom, w' = w + m') becomes one call of
/// the sgdgen_sgd_update_f32 FFI kernel: operands g, w, m, lr; flags [clip, decay, nesterov,
/// ema, overwrite, skip]; constants the float32 bits of [wd, mom, keep, take, c, c_neg]
/// (0.9 = 1063675494); each result in place over the argument @main donates to it. The
/// elementwise ops it replaces are gone.

// CHECK-LABEL: module @momentum
// CHECK:         %[[U:.*]]:2 = stablehlo.custom_call @sgdgen_sgd_update_f32(%arg2, %arg0, %arg1, %arg3)
// CHECK-SAME:      mhlo.backend_config = {constants = array<i64: 0, 1063675494, 0, 0, 0, 0>, flags = array<i64: 0, 0, 0, 0, 0, 0>}
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 1, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 2, operand_tuple_indices = []>]
// CHECK-SAME:      : (tensor<256x256xf32>, tensor<256x256xf32>, tensor<256x256xf32>, tensor<f32>) -> (tensor<256x256xf32>, tensor<256x256xf32>)
// CHECK-NOT:     stablehlo.multiply
// CHECK-NOT:     stablehlo.add
// CHECK:         return %[[U]]#0, %[[U]]#1
module @momentum attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<256x256xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<256x256xf32> {tf.aliasing_output = 1 : i32}, %g: tensor<256x256xf32>, %lr: tensor<f32>) -> (tensor<256x256xf32>, tensor<256x256xf32>) {
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

// -----

/// The benchmark's update: global_clipnorm scale s, decay (wd = 0.004), Nesterov, EMA (keep 0.99,
/// take 0.01): operands g, w, m, a, lr, s; three results.
// CHECK-LABEL: module @nesterov_decay_global_clip_ema
// CHECK:         %[[U:.*]]:3 = stablehlo.custom_call @sgdgen_sgd_update_f32(%arg3, %arg0, %arg1, %arg2, %arg4, %arg5)
// CHECK-SAME:      constants = array<i64: 998445679, 1063675494, 1065185444, 1008981770, 0, 0>, flags = array<i64: 1, 1, 1, 1, 0, 0>
// CHECK:         return %[[U]]#0, %[[U]]#1, %[[U]]#2
module @nesterov_decay_global_clip_ema attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %a: tensor<65536xf32> {tf.aliasing_output = 2 : i32}, %g: tensor<65536xf32>, %lr: tensor<f32>, %scale: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>) {
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

/// Operands of add and multiply in the other order (IEEE arithmetic does not tell them apart) match too.
// CHECK-LABEL: module @commuted_operands
// CHECK:         stablehlo.custom_call @sgdgen_sgd_update_f32(%arg2, %arg0, %arg1, %arg3)
// CHECK-SAME:      flags = array<i64: 0, 0, 0, 0, 0, 0>
module @commuted_operands attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %g: tensor<65536xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %lr_b, %neg : tensor<65536xf32>
    %mm = stablehlo.multiply %mom, %m : tensor<65536xf32>
    %m_new = stablehlo.add %mm, %step : tensor<65536xf32>
    %w_new = stablehlo.add %m_new, %w : tensor<65536xf32>
    return %w_new, %m_new : tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// clipnorm: (g * c) / s with c = 1.0 a constant and s = max(norm, c) a scalar: clip mode 2.
// CHECK-LABEL: module @clipnorm
// CHECK:         stablehlo.custom_call @sgdgen_sgd_update_f32(%arg2, %arg0, %arg1, %arg3, %arg4)
// CHECK-SAME:      constants = array<i64: 0, 1063675494, 0, 0, 1065353216, 0>, flags = array<i64: 2, 0, 0, 0, 0, 0>
module @clipnorm attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %g: tensor<65536xf32>, %lr: tensor<f32>, %denom: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>) {
    %c = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %c_b = stablehlo.broadcast_in_dim %c, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %d_b = stablehlo.broadcast_in_dim %denom, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %scaled = stablehlo.multiply %g, %c_b : tensor<65536xf32>
    %gc = stablehlo.divide %scaled, %d_b : tensor<65536xf32>
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %gc : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<65536xf32>
    return %w_new, %m_new : tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// clipvalue: max(min(g, c), c_neg) with c = 0.5, c_neg = -0.5: clip mode 3, no scalar operand.
// CHECK-LABEL: module @clipvalue
// CHECK:         stablehlo.custom_call @sgdgen_sgd_update_f32(%arg2, %arg0, %arg1, %arg3)
// CHECK-SAME:      constants = array<i64: 0, 1063675494, 0, 0, 1056964608, 3204448256>, flags = array<i64: 3, 0, 0, 0, 0, 0>
module @clipvalue attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %g: tensor<65536xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>) {
    %c = stablehlo.constant dense<5.000000e-01> : tensor<65536xf32>
    %c_neg = stablehlo.constant dense<-5.000000e-01> : tensor<65536xf32>
    %lo = stablehlo.minimum %g, %c : tensor<65536xf32>
    %gc = stablehlo.maximum %lo, %c_neg : tensor<65536xf32>
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %gc : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<65536xf32>
    return %w_new, %m_new : tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// EMA with overwrite: w' = select(due, a', w2), the i1 scalar due an operand; then the
/// non-finite skip: every result select(skip, its argument, its new value).
// CHECK-LABEL: module @overwrite_and_skip
// CHECK:         %[[U:.*]]:3 = stablehlo.custom_call @sgdgen_sgd_update_f32(%arg3, %arg0, %arg1, %arg2, %arg4, %arg5, %arg6)
// CHECK-SAME:      flags = array<i64: 0, 0, 0, 1, 1, 1>
// CHECK-NOT:     stablehlo.select
// CHECK:         return %[[U]]#0, %[[U]]#1, %[[U]]#2
module @overwrite_and_skip attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %a: tensor<65536xf32> {tf.aliasing_output = 2 : i32}, %g: tensor<65536xf32>, %lr: tensor<f32>, %due: tensor<i1>, %skip: tensor<i1>) -> (tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %keep = stablehlo.constant dense<9.900000e-01> : tensor<65536xf32>
    %take = stablehlo.constant dense<0.00999999977> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w2 = stablehlo.add %w, %m_new : tensor<65536xf32>
    %old = stablehlo.multiply %keep, %a : tensor<65536xf32>
    %new = stablehlo.multiply %take, %w2 : tensor<65536xf32>
    %a_new = stablehlo.add %old, %new : tensor<65536xf32>
    %w_new = stablehlo.select %due, %a_new, %w2 : tensor<i1>, tensor<65536xf32>
    %w_kept = stablehlo.select %skip, %w, %w_new : tensor<i1>, tensor<65536xf32>
    %m_kept = stablehlo.select %skip, %m, %m_new : tensor<i1>, tensor<65536xf32>
    %a_kept = stablehlo.select %skip, %a, %a_new : tensor<i1>, tensor<65536xf32>
    return %w_kept, %m_kept, %a_kept : tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// An intermediate something else also reads (here the step -g*lr, returned as well) stays for
/// that reader; the update is still one call.
// CHECK-LABEL: module @shared_intermediate
// CHECK:         %[[NEG:.*]] = stablehlo.negate %arg2
// CHECK:         %[[STEP:.*]] = stablehlo.multiply %[[NEG]]
// CHECK:         %[[U:.*]]:2 = stablehlo.custom_call @sgdgen_sgd_update_f32
// CHECK:         return %[[U]]#0, %[[U]]#1, %[[STEP]]
module @shared_intermediate attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32> {tf.aliasing_output = 0 : i32}, %m: tensor<65536xf32> {tf.aliasing_output = 1 : i32}, %g: tensor<65536xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<65536xf32>
    return %w_new, %m_new, %step : tensor<65536xf32>, tensor<65536xf32>, tensor<65536xf32>
  }
}
