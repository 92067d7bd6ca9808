// RUN: sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-kernels{min-elements=16})' | filecheck %s

/// `min-elements` sets the size from which a sum goes to the kernel (16 here).
// CHECK-LABEL: module @threshold_option
// CHECK:         stablehlo.custom_call @sgdgen_sum_squares_f32(%arg0) {{.*}} : (tensor<16xf32>) -> tensor<f64>
// CHECK:         stablehlo.reduce({{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<15xf64>, tensor<f64>) -> tensor<f64>
module @threshold_option attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<16xf32>, %h: tensor<15xf32>) -> (tensor<f64>, tensor<f64>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %w = stablehlo.convert %sq : (tensor<16xf32>) -> tensor<16xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<16xf64>, tensor<f64>) -> tensor<f64>
    %sq2 = stablehlo.multiply %h, %h : tensor<15xf32>
    %w2 = stablehlo.convert %sq2 : (tensor<15xf32>) -> tensor<15xf64>
    %s2 = stablehlo.reduce(%w2 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<15xf64>, tensor<f64>) -> tensor<f64>
    return %s, %s2 : tensor<f64>, tensor<f64>
  }
}
