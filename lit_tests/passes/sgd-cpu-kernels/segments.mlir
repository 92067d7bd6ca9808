// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-cpu-kernels)' | filecheck %s

/// The norm sum of a flat bucket's gradient built from its members' gradients (a concatenate of
/// 1-D float32 pieces, a 2-D member reshaped first) becomes ONE call over the pieces with ONE
/// float64 result, their sum together (32768 + 32767 + 1 = the 65,536 default); the square, the
/// convert and the concatenate are gone.
// CHECK-LABEL: module @sum_of_pieces
// CHECK:         %[[F:.*]] = stablehlo.reshape %arg0 : (tensor<128x256xf32>) -> tensor<32768xf32>
// CHECK-NOT:     stablehlo.concatenate
// CHECK:         %[[S:.*]] = stablehlo.custom_call @sgdgen_sum_squares_f32(%[[F]], %arg1, %arg2) {{.*}} : (tensor<32768xf32>, tensor<32767xf32>, tensor<1xf32>) -> tensor<f64>
// CHECK-NOT:     stablehlo.concatenate
// CHECK-NOT:     stablehlo.multiply
// CHECK-NOT:     stablehlo.convert
// CHECK-NOT:     stablehlo.reduce
// CHECK:         return %[[S]] : tensor<f64>
module @sum_of_pieces attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g0: tensor<128x256xf32>, %g1: tensor<32767xf32>, %g2: tensor<1xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %f0 = stablehlo.reshape %g0 : (tensor<128x256xf32>) -> tensor<32768xf32>
    %g = stablehlo.concatenate %f0, %g1, %g2, dim = 0 : (tensor<32768xf32>, tensor<32767xf32>, tensor<1xf32>) -> tensor<65536xf32>
    %sq = stablehlo.multiply %g, %g : tensor<65536xf32>
    %w = stablehlo.convert %sq : (tensor<65536xf32>) -> tensor<65536xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// The pieces' call is not grouped with the sums of the block's arguments (which share their
/// call at the block's start, one result each): it is a call of its own, before its reduce's place.
// CHECK-LABEL: module @apart_from_the_arguments_call
// CHECK:         func.func public @main
// CHECK-NEXT:      %[[A:.*]]:2 = stablehlo.custom_call @sgdgen_sum_squares_f32(%arg0, %arg1) {{.*}} : (tensor<40000xf32>, tensor<100x300xf32>) -> (tensor<f64>, tensor<f64>)
// CHECK-NOT:       stablehlo.concatenate
// CHECK:           %[[P:.*]] = stablehlo.custom_call @sgdgen_sum_squares_f32(%arg2, %arg3) {{.*}} : (tensor<50000xf32>, tensor<20000xf32>) -> tensor<f64>
// CHECK-NOT:       stablehlo.reduce
// CHECK:           %[[T:.*]] = stablehlo.add %[[A]]#0, %[[A]]#1 : tensor<f64>
// CHECK:           return %[[T]], %[[P]]
module @apart_from_the_arguments_call attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%h: tensor<40000xf32>, %k: tensor<100x300xf32>, %g0: tensor<50000xf32>, %g1: tensor<20000xf32>) -> (tensor<f64>, tensor<f64>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %sq = stablehlo.multiply %h, %h : tensor<40000xf32>
    %w = stablehlo.convert %sq : (tensor<40000xf32>) -> tensor<40000xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<40000xf64>, tensor<f64>) -> tensor<f64>
    %g = stablehlo.concatenate %g0, %g1, dim = 0 : (tensor<50000xf32>, tensor<20000xf32>) -> tensor<70000xf32>
    %sqg = stablehlo.multiply %g, %g : tensor<70000xf32>
    %wg = stablehlo.convert %sqg : (tensor<70000xf32>) -> tensor<70000xf64>
    %sg = stablehlo.reduce(%wg init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<70000xf64>, tensor<f64>) -> tensor<f64>
    %sq2 = stablehlo.multiply %k, %k : tensor<100x300xf32>
    %w2 = stablehlo.convert %sq2 : (tensor<100x300xf32>) -> tensor<100x300xf64>
    %s2 = stablehlo.reduce(%w2 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<100x300xf64>, tensor<f64>) -> tensor<f64>
    %t = stablehlo.add %s, %s2 : tensor<f64>
    return %t, %sg : tensor<f64>, tensor<f64>
  }
}

// -----

/// A concatenate something else reads (here returned too) stays for that reader; the sum is
/// still the call over the pieces.
// CHECK-LABEL: module @concat_read_elsewhere
// CHECK:         %[[G:.*]] = stablehlo.concatenate %arg0, %arg1, dim = 0
// CHECK:         %[[S:.*]] = stablehlo.custom_call @sgdgen_sum_squares_f32(%arg0, %arg1) {{.*}} -> tensor<f64>
// CHECK:         return %[[S]], %[[G]]
module @concat_read_elsewhere attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g0: tensor<40000xf32>, %g1: tensor<25536xf32>) -> (tensor<f64>, tensor<65536xf32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %g = stablehlo.concatenate %g0, %g1, dim = 0 : (tensor<40000xf32>, tensor<25536xf32>) -> tensor<65536xf32>
    %sq = stablehlo.multiply %g, %g : tensor<65536xf32>
    %w = stablehlo.convert %sq : (tensor<65536xf32>) -> tensor<65536xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65536xf64>, tensor<f64>) -> tensor<f64>
    return %s, %g : tensor<f64>, tensor<65536xf32>
  }
}

// -----

/// min-elements counts the pieces' elements together: 40000 + 25535 is one under the default
/// 65,536, so nothing changes (the concatenate, square, convert and reduce all stay).
// CHECK-LABEL: module @pieces_under_the_threshold
// CHECK-NOT:     custom_call
// CHECK:         %[[G:.*]] = stablehlo.concatenate %arg0, %arg1, dim = 0
// CHECK:         %[[SQ:.*]] = stablehlo.multiply %[[G]], %[[G]]
// CHECK:         stablehlo.convert %[[SQ]]
// CHECK:         stablehlo.reduce
// CHECK-NOT:     custom_call
module @pieces_under_the_threshold attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g0: tensor<40000xf32>, %g1: tensor<25535xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %g = stablehlo.concatenate %g0, %g1, dim = 0 : (tensor<40000xf32>, tensor<25535xf32>) -> tensor<65535xf32>
    %sq = stablehlo.multiply %g, %g : tensor<65535xf32>
    %w = stablehlo.convert %sq : (tensor<65535xf32>) -> tensor<65535xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<65535xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}

// -----

/// A concatenate of 2-D pieces is not a bucket's gradient: its sum is the plain one-operand
/// call on the concatenate's result.
// CHECK-LABEL: module @two_d_concat
// CHECK:         %[[G:.*]] = stablehlo.concatenate %arg0, %arg1, dim = 0 : (tensor<100x256xf32>, tensor<156x256xf32>) -> tensor<256x256xf32>
// CHECK:         stablehlo.custom_call @sgdgen_sum_squares_f32(%[[G]]) {{.*}} : (tensor<256x256xf32>) -> tensor<f64>
module @two_d_concat attributes {mhlo.num_partitions = 1 : i32} {
  func.func public @main(%g0: tensor<100x256xf32>, %g1: tensor<156x256xf32>) -> tensor<f64> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f64>
    %g = stablehlo.concatenate %g0, %g1, dim = 0 : (tensor<100x256xf32>, tensor<156x256xf32>) -> tensor<256x256xf32>
    %sq = stablehlo.multiply %g, %g : tensor<256x256xf32>
    %w = stablehlo.convert %sq : (tensor<256x256xf32>) -> tensor<256x256xf64>
    %s = stablehlo.reduce(%w init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<256x256xf64>, tensor<f64>) -> tensor<f64>
    return %s : tensor<f64>
  }
}
