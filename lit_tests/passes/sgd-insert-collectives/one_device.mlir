// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// On one device (a mesh with no axes, or only axes of size 1) sgd-insert-collectives adds
/// nothing: no sdy.manual_computation, no partition_id, no all_reduce; @main keeps its
/// body on global (= local) types. The checks still run (invalid.mlir, one_device_invalid).

/// No axes at all: the mesh of `sgdgen.SGD` on a single device.
// CHECK-LABEL: module @no_axes
// CHECK-NOT:     sdy.manual_computation
// CHECK-NOT:     all_reduce
// CHECK:         %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[T:.*]] = stablehlo.add %[[P]], %{{.*}} {sgdgen.norms} : tensor<f32>
// CHECK:         return %[[T]], %{{.*}} : tensor<f32>, tensor<8x4xf32>
module @no_axes {
  sdy.mesh @mesh = <[]>
  func.func public @main(%g: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %h: tensor<3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}, tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %gg = stablehlo.multiply %g, %g : tensor<8x4xf32>
    %p = stablehlo.reduce(%gg init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<8x4xf32>, tensor<f32>) -> tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<3xf32>
    %q = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<3xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total, %gg : tensor<f32>, tensor<8x4xf32>
  }
}

// -----

/// Two axes of size 1, a variable "sharded" on one of them: still one device, still nothing added.
// CHECK-LABEL: module @size_one_axes
// CHECK-NOT:     sdy.manual_computation
// CHECK-NOT:     partition_id
// CHECK-NOT:     all_reduce
// CHECK:         return %{{.*}} : tensor<8x4xf32>
module @size_one_axes {
  sdy.mesh @mesh = <["batch"=1, "model"=1]>
  func.func public @main(%w: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>})
      -> (tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}) {
    %two = stablehlo.constant dense<2.0> : tensor<8x4xf32>
    %r = stablehlo.multiply %w, %two : tensor<8x4xf32>
    return %r : tensor<8x4xf32>
  }
}
