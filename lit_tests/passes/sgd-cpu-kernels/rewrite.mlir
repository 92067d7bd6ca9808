// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-kernels)' | filecheck %s

/// A float32 norm's share, sum(float64(g * g)) over every element, becomes one call of the
/// sgdgen_sum_squares_f32 FFI kernel on g (typed FFI: mhlo.backend_config dictionary); the
/// square and the convert it replaces are gone.

// CHECK-LABEL: module @full_sum_of_a_large_float32_gradient
// CHECK:         %[[S:.*]] = stablehlo.custom_call @sgdgen_sum_squares_f32(%arg0) {backend_config = "", mhlo.backend_config = {}} : (tensor<8x8192xf32>) -> tensor<f64>
// CHECK-NOT:     stablehlo.reduce
// CHECK-NOT:     stablehlo.convert
// CHECK:         return %[[S]] : tensor<f64>
module @full_sum_of_a_large_float32_gradient attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g: tensor<8x8192xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<8x8192xf32>
    %w = stablehlo.convert %sq : (tensor<8x8192xf32>) -> tensor<8x8192xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x8192xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// A module without mhlo.num_partitions is one partition too.
// CHECK-LABEL: module @no_partition_count
// CHECK:         stablehlo.custom_call @sgdgen_sum_squares_f32
module @no_partition_count {
  func.func public @main(%g: tensor<65536xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %g, %g : tensor<65536xf32>
    %w = stablehlo.convert %sq : (tensor<65536xf32>) -> tensor<65536xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// Inside a manual computation over every mesh axis the operand is the device's shard: the
/// call takes the local 8x8192 slice.
// CHECK-LABEL: module @inside_a_manual_computation
// CHECK:         sdy.manual_computation
// CHECK:         stablehlo.custom_call @sgdgen_sum_squares_f32(%{{.*}}) {{.*}} : (tensor<8x8192xf32>) -> tensor<f64>
// CHECK:         stablehlo.all_reduce
module @inside_a_manual_computation attributes {mhlo.num_partitions = 8 : i32} {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%g: tensor<8x32768xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) -> (tensor<f64> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %0 = sdy.manual_computation(%g) in_shardings=[<@mesh, [{}, {"model"}]>] out_shardings=[<@mesh, []>] manual_axes={"batch", "model"} (%lg: tensor<8x8192xf32>) {
      %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
      %sq = stablehlo.multiply %lg, %lg : tensor<8x8192xf32>
      %w = stablehlo.convert %sq : (tensor<8x8192xf32>) -> tensor<8x8192xf64>
      %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x8192xf64>, tensor<f64>) -> tensor<f64>
      %r = "stablehlo.all_reduce"(%s) <{channel_handle = #stablehlo.channel_handle<handle = 1, type = 1>, replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]> : tensor<1x8xi64>, use_global_device_ids}> ({
      ^bb0(%a: tensor<f64>, %b: tensor<f64>):
        %t = stablehlo.add %a, %b : tensor<f64>
        stablehlo.return %t : tensor<f64>
      }) : (tensor<f64>) -> tensor<f64>
      sdy.return %r : tensor<f64>
    } : (tensor<8x32768xf32>) -> tensor<f64>
    return %0 : tensor<f64>
  }
}
