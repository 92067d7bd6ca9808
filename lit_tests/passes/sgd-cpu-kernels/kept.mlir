// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-kernels)' | filecheck %s

/// What is not a large, local, float32 norm sum keeps XLA's reduce.

/// Under min-elements (65,536 by default, counted over the call's sums): a call costs more than the sum.
// CHECK-LABEL: module @small_gradient
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @small_gradient attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<65535xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<65535xf32>
    %w = stablehlo.convert %sq : (tensor<65535xf32>) -> tensor<65535xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65535xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// A bfloat16 norm (products in bfloat16, the sum in float32) is not the kernel's.
// CHECK-LABEL: module @bfloat16_gradient
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @bfloat16_gradient attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<65536xbf16>) -> tensor<f32> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<65536xbf16>
    %w = stablehlo.convert %sq : (tensor<65536xbf16>) -> tensor<65536xf32>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65536xf32>, tensor<f32>) -> tensor<f32>
    return %s : tensor<f32>
  }
}

// -----

/// A reduction over some dimensions only is not a norm.
// CHECK-LABEL: module @partial_reduction
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @partial_reduction attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<8x8192xf32>) -> tensor<8xf64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<8x8192xf32>
    %w = stablehlo.convert %sq : (tensor<8x8192xf32>) -> tensor<8x8192xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [1] : (tensor<8x8192xf64>, tensor<f64>) -> tensor<8xf64>
    return %s : tensor<8xf64>
  }
}

// -----

/// A product of two different values is a dot product, not a sum of squares.
// CHECK-LABEL: module @product_of_two_values
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @product_of_two_values attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<65536xf32>, %h: tensor<65536xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %h : tensor<65536xf32>
    %w = stablehlo.convert %sq : (tensor<65536xf32>) -> tensor<65536xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// A sum that starts from something other than +0.0 is not the kernel's.
// CHECK-LABEL: module @nonzero_init
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @nonzero_init attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<65536xf32>) -> tensor<f64> {
    %one = stablehlo.constant dense<1.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<65536xf32>
    %w = stablehlo.convert %sq : (tensor<65536xf32>) -> tensor<65536xf64>
    %s = stablehlo.reduce(%w init: %one) applies stablehlo.add across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// A maximum is not a sum.
// CHECK-LABEL: module @max_reduction
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @max_reduction attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<65536xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<65536xf32>
    %w = stablehlo.convert %sq : (tensor<65536xf32>) -> tensor<65536xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.maximum across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// Several partitions without a manual computation (a stage-0 module): the operand is a
/// sharded global value, which a call would gather whole.
// CHECK-LABEL: module @partitioned_but_not_manual
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @partitioned_but_not_manual attributes {mhlo.num_partitions = 8 : i32} {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%g: tensor<8x8192xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<8x8192xf32>
    %w = stablehlo.convert %sq : (tensor<8x8192xf32>) -> tensor<8x8192xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x8192xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// A manual computation over some axes only leaves the others to the partitioner.
// CHECK-LABEL: module @manual_over_one_axis_of_two
// CHECK-NOT:     custom_call
// CHECK:         stablehlo.reduce
module @manual_over_one_axis_of_two attributes {mhlo.num_partitions = 8 : i32} {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%g: tensor<8x8192xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) -> (tensor<f64> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %0 = sdy.manual_computation(%g) in_shardings=[<@mesh, [{}, {"model"}]>] out_shardings=[<@mesh, []>] manual_axes={"model"} (%lg: tensor<8x2048xf32>) {
      %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
      %sq = stablehlo.multiply %lg, %lg : tensor<8x2048xf32>
      %w = stablehlo.convert %sq : (tensor<8x2048xf32>) -> tensor<8x2048xf64>
      %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x2048xf64>, tensor<f64>) -> tensor<f64>
      sdy.return %s : tensor<f64>
    } : (tensor<8x8192xf32>) -> tensor<f64>
    return %0 : tensor<f64>
  }
}
