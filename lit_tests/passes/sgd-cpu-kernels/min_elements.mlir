// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-kernels{min-elements=32})' | filecheck %s

/// `min-elements` is the size from which a call is made, counted over all the sums it would
/// take (32 here).

/// 16 + 15 elements: under 32, both sums stay XLA's reduces.
// CHECK-LABEL: module @under_the_threshold
// CHECK-NOT:     custom_call
// CHECK-COUNT-2: stablehlo.reduce
module @under_the_threshold attributes {mhlo.num_partitions = 1 : i32} {
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

// -----

/// 16 + 16 elements: at the threshold, one call for both.
// CHECK-LABEL: module @at_the_threshold
// CHECK:         stablehlo.custom_call @sgdgen_sum_squares_f32(%arg0, %arg1) {{.*}} : (tensor<16xf32>, tensor<16xf32>) -> (tensor<f64>, tensor<f64>)
// CHECK-NOT:     stablehlo.reduce
module @at_the_threshold attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<16xf32>, %h: tensor<16xf32>) -> (tensor<f64>, tensor<f64>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %w = stablehlo.convert %sq : (tensor<16xf32>) -> tensor<16xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<16xf64>, tensor<f64>) -> tensor<f64>
    %sq2 = stablehlo.multiply %h, %h : tensor<16xf32>
    %w2 = stablehlo.convert %sq2 : (tensor<16xf32>) -> tensor<16xf64>
    %s2 = stablehlo.reduce(%w2 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<16xf64>, tensor<f64>) -> tensor<f64>
    return %s, %s2 : tensor<f64>, tensor<f64>
  }
}
