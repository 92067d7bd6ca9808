// RUN: sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-update{min-elements=4096})' | filecheck %s --check-prefix=LOW
// RUN: sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-update{min-elements=4097})' | filecheck %s --check-prefix=HIGH

/// min-elements is the smallest variable (in elements) that gets a call.
// LOW:       stablehlo.custom_call @sgdgen_sgd_update_f32
// HIGH-NOT:  custom_call
module @threshold attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%w: tensor<64x64xf32>, %m: tensor<64x64xf32>, %g: tensor<64x64xf32>, %lr: tensor<f32>) -> (tensor<64x64xf32>, tensor<64x64xf32>) {
    %mom = stablehlo.constant dense<0.899999976> : tensor<64x64xf32>
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<64x64xf32>
    %neg = stablehlo.negate %g : tensor<64x64xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<64x64xf32>
    %mm = stablehlo.multiply %m, %mom : tensor<64x64xf32>
    %m_new = stablehlo.add %step, %mm : tensor<64x64xf32>
    %w_new = stablehlo.add %w, %m_new : tensor<64x64xf32>
    return %w_new, %m_new : tensor<64x64xf32>, tensor<64x64xf32>
  }
}
