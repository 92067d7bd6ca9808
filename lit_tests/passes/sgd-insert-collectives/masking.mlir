// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// Exact norms across shards: a variable replicated over a mesh axis has a full copy of
/// its shard on every device along that axis, so its partial would be counted once per
/// copy by the all-devices all_reduce. Only the device at coordinate 0 of every
/// replicated axis keeps its partial; the others select 0. The coordinate of axis i
/// comes from the device id: (partition_id / stride_i) % size_i, where stride_i is the
/// product of the sizes of the axes after i (row-major mesh). Here "a"=2, "b"=4, so
/// "a" has stride 4 and size 2, and "b" has stride 1 and size 4: axes of different
/// sizes, so a swapped stride or size shows. (Each case has a second partial, of a
/// variable sharded over every axis, so the joined value is an add; a single partial
/// is single_partial_masked.mlir.)

/// Replicated over "a" only (sharded on "b"): coordinate on "a" = (pid / 4) % 2.
// CHECK-LABEL: module @replicated_over_a
// CHECK:           %[[PID:.*]] = stablehlo.partition_id : tensor<ui32>
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[STRIDE:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK-NEXT:      %[[Q:.*]] = stablehlo.divide %[[PID]], %[[STRIDE]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE:.*]] = stablehlo.constant dense<2> : tensor<ui32>
// CHECK-NEXT:      %[[COORD:.*]] = stablehlo.remainder %[[Q]], %[[SIZE]] : tensor<ui32>
// CHECK-NEXT:      %[[ZERO:.*]] = stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[FIRST:.*]] = stablehlo.compare EQ, %[[COORD]], %[[ZERO]] : (tensor<ui32>, tensor<ui32>) -> tensor<i1>
// CHECK-NEXT:      %[[NONE:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<f32>
// CHECK-NEXT:      %[[MASKED:.*]] = stablehlo.select %[[FIRST]], %[[P]], %[[NONE]] : tensor<i1>, tensor<f32>
/// The masked partial, not the raw one, is what the all_reduce sums.
// CHECK:           %[[TOTAL:.*]] = stablehlo.add %[[MASKED]], %{{.*}} {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:      %[[SUM:.*]] = "stablehlo.all_reduce"(%[[TOTAL]])
// CHECK-SAME{LITERAL}: replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]> : tensor<1x8xi64>
module @replicated_over_a {
  sdy.mesh @mesh = <["a"=2, "b"=4]>
  func.func public @main(%g: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"b"}]>},
                         %h: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a", "b"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %p = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<16xf32>
    %q = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// Replicated over "b" only (sharded on "a"): coordinate on "b" = (pid / 1) % 4.
// CHECK-LABEL: module @replicated_over_b
// CHECK:           %[[PID:.*]] = stablehlo.partition_id : tensor<ui32>
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[STRIDE:.*]] = stablehlo.constant dense<1> : tensor<ui32>
// CHECK-NEXT:      %[[Q:.*]] = stablehlo.divide %[[PID]], %[[STRIDE]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK-NEXT:      %[[COORD:.*]] = stablehlo.remainder %[[Q]], %[[SIZE]] : tensor<ui32>
// CHECK-NEXT:      %[[ZERO:.*]] = stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[FIRST:.*]] = stablehlo.compare EQ, %[[COORD]], %[[ZERO]] : (tensor<ui32>, tensor<ui32>) -> tensor<i1>
// CHECK-NEXT:      %[[NONE:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<f32>
// CHECK-NEXT:      %[[MASKED:.*]] = stablehlo.select %[[FIRST]], %[[P]], %[[NONE]] : tensor<i1>, tensor<f32>
// CHECK:           %[[TOTAL:.*]] = stablehlo.add %[[MASKED]], %{{.*}} {sgdgen.norms}
// CHECK-NEXT:      "stablehlo.all_reduce"(%[[TOTAL]])
module @replicated_over_b {
  sdy.mesh @mesh = <["a"=2, "b"=4]>
  func.func public @main(%g: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a"}]>},
                         %h: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a", "b"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %p = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<16xf32>
    %q = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// Replicated over both axes: only device 0 keeps the partial; both coordinates are
/// tested and the tests are and-ed.
// CHECK-LABEL: module @replicated_over_both
// CHECK:           %[[PID:.*]] = stablehlo.partition_id : tensor<ui32>
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[STRIDE_A:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK-NEXT:      %[[QA:.*]] = stablehlo.divide %[[PID]], %[[STRIDE_A]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE_A:.*]] = stablehlo.constant dense<2> : tensor<ui32>
// CHECK-NEXT:      %[[COORD_A:.*]] = stablehlo.remainder %[[QA]], %[[SIZE_A]] : tensor<ui32>
// CHECK-NEXT:      %[[ZERO_A:.*]] = stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[FIRST_A:.*]] = stablehlo.compare EQ, %[[COORD_A]], %[[ZERO_A]]
// CHECK-NEXT:      %[[STRIDE_B:.*]] = stablehlo.constant dense<1> : tensor<ui32>
// CHECK-NEXT:      %[[QB:.*]] = stablehlo.divide %[[PID]], %[[STRIDE_B]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE_B:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK-NEXT:      %[[COORD_B:.*]] = stablehlo.remainder %[[QB]], %[[SIZE_B]] : tensor<ui32>
// CHECK-NEXT:      %[[ZERO_B:.*]] = stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[FIRST_B:.*]] = stablehlo.compare EQ, %[[COORD_B]], %[[ZERO_B]]
// CHECK-NEXT:      %[[FIRST:.*]] = stablehlo.and %[[FIRST_A]], %[[FIRST_B]] : tensor<i1>
// CHECK-NEXT:      %[[NONE:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<f32>
// CHECK-NEXT:      %[[MASKED:.*]] = stablehlo.select %[[FIRST]], %[[P]], %[[NONE]] : tensor<i1>, tensor<f32>
module @replicated_over_both {
  sdy.mesh @mesh = <["a"=2, "b"=4]>
  func.func public @main(%g: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
                         %h: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a", "b"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %p = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<16xf32>
    %q = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// Sharded over every axis (two dims or one): each device holds a distinct shard, so
/// the partials are summed unmasked.
// CHECK-LABEL: module @sharded_over_every_axis_not_masked
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<4x2xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NOT:       stablehlo.select
// CHECK:           %[[Q:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<2xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[TOTAL:.*]] = stablehlo.add %[[P]], %[[Q]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:      "stablehlo.all_reduce"(%[[TOTAL]])
// CHECK-NOT:       stablehlo.select
module @sharded_over_every_axis_not_masked {
  sdy.mesh @mesh = <["a"=2, "b"=4]>
  func.func public @main(%g: tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a"}, {"b"}]>},
                         %h: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"b", "a"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<8x8xf32>
    %p = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<8x8xf32>, tensor<f32>) -> tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<16xf32>
    %q = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// The variable a partial belongs to is found through scalar ops after the reduce:
/// an l2_loss halves the reduced sum (multiply by 0.5), and that multiply is the
/// tagged partial; the mask still follows the layout of the tensor that was reduced.
// CHECK-LABEL: module @partial_after_scalar_ops
// CHECK:           %[[SUM:.*]] = stablehlo.reduce{{.*}} : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
// CHECK:           %[[P:.*]] = stablehlo.multiply %[[SUM]], %{{.*}} {sgdgen.norm_partial} : tensor<f32>
// CHECK-NEXT:      %[[STRIDE:.*]] = stablehlo.constant dense<1> : tensor<ui32>
// CHECK:           %[[SIZE:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK:           stablehlo.select %{{.*}}, %[[P]], %{{.*}} : tensor<i1>, tensor<f32>
// CHECK:           %[[Q:.*]] = stablehlo.multiply %{{.*}}, %{{.*}} {sgdgen.norm_partial} : tensor<f32>
// CHECK-NOT:       stablehlo.select
// CHECK:           stablehlo.add %{{.*}}, %[[Q]] {sgdgen.norms} : tensor<f32>
module @partial_after_scalar_ops {
  sdy.mesh @mesh = <["a"=2, "b"=4]>
  func.func public @main(%g: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a"}]>},
                         %h: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a", "b"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %half = stablehlo.constant dense<0.5> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %p = stablehlo.multiply %sum, %half {sgdgen.norm_partial} : tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<16xf32>
    %hsum = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %q = stablehlo.multiply %hsum, %half {sgdgen.norm_partial} : tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}
