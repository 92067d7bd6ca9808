// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-kernels)' | filecheck %s

/// The sums of one block's arguments share ONE call at the block's start, one f64 result per
/// sum, each replacing its reduce: 40,000 + 30,000 elements together pass the 65,536 default.
// CHECK-LABEL: module @arguments_share_one_call
// CHECK:         func.func public @main
// CHECK-NEXT:      %[[C:.*]]:2 = stablehlo.custom_call @sgdgen_sum_squares_f32(%arg0, %arg1) {{.*}} : (tensor<40000xf32>, tensor<100x300xf32>) -> (tensor<f64>, tensor<f64>)
// CHECK-NOT:       stablehlo.reduce
// CHECK:           %[[T:.*]] = stablehlo.add %[[C]]#0, %[[C]]#1 : tensor<f64>
// CHECK:           return %[[T]]
module @arguments_share_one_call attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<40000xf32>, %h: tensor<100x300xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<40000xf32>
    %w = stablehlo.convert %sq : (tensor<40000xf32>) -> tensor<40000xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<40000xf64>, tensor<f64>) -> tensor<f64>
    %sq2 = stablehlo.multiply %h, %h : tensor<100x300xf32>
    %w2 = stablehlo.convert %sq2 : (tensor<100x300xf32>) -> tensor<100x300xf64>
    %s2 = stablehlo.reduce(%w2 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<100x300xf64>, tensor<f64>) -> tensor<f64>
    %t = stablehlo.add %s, %s2 : tensor<f64>
    return %t : tensor<f64>
  }
}

// -----

/// A sum of a computed value gets a call of its own, placed before it (the value is defined
/// after the block's start); the arguments' sums are grouped apart from it.
// CHECK-LABEL: module @computed_value_apart
// CHECK:         stablehlo.custom_call @sgdgen_sum_squares_f32(%arg0) {{.*}} : (tensor<65536xf32>) -> tensor<f64>
// CHECK:         %[[N:.*]] = stablehlo.negate %arg0
// CHECK:         stablehlo.custom_call @sgdgen_sum_squares_f32(%[[N]]) {{.*}} : (tensor<65536xf32>) -> tensor<f64>
module @computed_value_apart attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<65536xf32>) -> (tensor<f64>, tensor<f64>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %n = stablehlo.negate %g : tensor<65536xf32>
    %sq = stablehlo.multiply %g, %g : tensor<65536xf32>
    %w = stablehlo.convert %sq : (tensor<65536xf32>) -> tensor<65536xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    %sq2 = stablehlo.multiply %n, %n : tensor<65536xf32>
    %w2 = stablehlo.convert %sq2 : (tensor<65536xf32>) -> tensor<65536xf64>
    %s2 = stablehlo.reduce(%w2 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    return %s, %s2 : tensor<f64>, tensor<f64>
  }
}
