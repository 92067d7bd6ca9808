// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-update)' | filecheck %s

/// What is not exactly the kernel's formula, on a large local float32 variable, stays XLA's.

/// Under min-elements (65,536 by default): a call and its thread wake-up cost more than a small loop.
// CHECK-LABEL: module @small_variable
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.add
module @small_variable attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65535xf32>, %m: tensor<65535xf32>, %g: tensor<65535xf32>, %lr: tensor<f32>) -> (tensor<65535xf32>, tensor<65535xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65535xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65535xf32>
    %neg = stablehlo.negate %g : tensor<65535xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65535xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65535xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65535xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<65535xf32>
    return %w_new, %m_new : tensor<65535xf32>, tensor<65535xf32>
  }
}

// -----

/// A float16 variable is not the kernel's (it updates float32 only).
// CHECK-LABEL: module @float16_variable
// CHECK-NOT:     custom_call
module @float16_variable attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf16>, %m: tensor<65536xf16>, %g: tensor<65536xf16>, %lr: tensor<f16>) -> (tensor<65536xf16>, tensor<65536xf16>) {
    %mom = stablehlo.constant dense<8.999020e-01> : tensor<65536xf16>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f16>) -> tensor<65536xf16>
    %neg = stablehlo.negate %g : tensor<65536xf16>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf16>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf16>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf16>
    %w_new = stablehlo.add %w, %m_new : tensor<65536xf16>
    return %w_new, %m_new : tensor<65536xf16>, tensor<65536xf16>
  }
}

// -----

/// Decay associated otherwise, w - w * (wd * lr), rounds otherwise: not the kernel's formula.
// CHECK-LABEL: module @other_association
// CHECK-NOT:     custom_call
module @other_association attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32>, %m: tensor<65536xf32>, %g: tensor<65536xf32>, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>) {
    %wd = stablehlo.constant dense<4.000000e-03> : tensor<65536xf32>
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %wd_lr = stablehlo.multiply %wd, %lr_b : tensor<65536xf32>
    %decay = stablehlo.multiply %w, %wd_lr : tensor<65536xf32>
    %w1 = stablehlo.subtract %w, %decay : tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w_new = stablehlo.add %w1, %m_new : tensor<65536xf32>
    return %w_new, %m_new : tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// A momentum whose weight is not returned (no w' = w + m' beside it) is no update of the kernel's.
// CHECK-LABEL: module @momentum_alone
// CHECK-NOT:     custom_call
module @momentum_alone attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%m: tensor<65536xf32>, %g: tensor<65536xf32>, %lr: tensor<f32>) -> tensor<65536xf32> {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    return %m_new : tensor<65536xf32>
  }
}

// -----

/// A select on an elementwise predicate is no skip or overwrite (those take an i1 scalar).
// CHECK-LABEL: module @elementwise_select
// CHECK-NOT:     custom_call
module @elementwise_select attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<65536xf32>, %m: tensor<65536xf32>, %g: tensor<65536xf32>, %lr: tensor<f32>, %p: tensor<65536xi1>) -> (tensor<65536xf32>, tensor<65536xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<65536xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<65536xf32>
    %neg = stablehlo.negate %g : tensor<65536xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<65536xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<65536xf32>
    %m_new = stablehlo.add %step, %mm : tensor<65536xf32>
    %w2 = stablehlo.add %w, %m_new : tensor<65536xf32>
    %w_kept = stablehlo.select %p, %w, %w2 : tensor<65536xi1>, tensor<65536xf32>
    %m_kept = stablehlo.select %p, %m, %m_new : tensor<65536xi1>, tensor<65536xf32>
    return %w_kept, %m_kept : tensor<65536xf32>, tensor<65536xf32>
  }
}

// -----

/// A stage-0 module on several devices: the partitioner would gather a sharded operand whole.
// CHECK-LABEL: module @several_partitions
// CHECK-NOT:     custom_call
module @several_partitions attributes {mhlo.num_partitions = 8 : i32} {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%w: tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}, %m: tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}, %g: tensor<65536xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}, %lr: tensor<f32>) -> (tensor<65536xf32>, tensor<65536xf32>) {
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
