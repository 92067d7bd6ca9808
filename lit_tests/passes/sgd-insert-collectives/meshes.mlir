// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// Meshes other than the 2-axis one: the manual axes are always all mesh axes, the one
/// replica group always lists every device, and mask strides follow the axis order. The
/// mesh symbol is whatever the module names it (@devices below), never assumed to be @mesh.

// CHECK-LABEL: module @named_devices
// CHECK:         sdy.manual_computation(%{{.*}}) in_shardings=[<@devices, [{"d"}]>] out_shardings=[<@devices, []>] manual_axes={"d"} (%{{.*}}: tensor<2xf32>)
// CHECK:           "stablehlo.all_reduce"
// CHECK-SAME{LITERAL}: replica_groups = dense<[[0, 1, 2, 3]]> : tensor<1x4xi64>
module @named_devices {
  sdy.mesh @devices = <["d"=4]>
  func.func public @main(%g: tensor<8xf32> {sdy.sharding = #sdy.sharding<@devices, [{"d"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@devices, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %gg = stablehlo.multiply %g, %g : tensor<8xf32>
    %p = stablehlo.reduce(%gg init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial, sgdgen.norms} : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
    return %p : tensor<f32>
  }
}

// -----

/// Three axes "x"=2, "y"=2, "z"=2 (8 devices). A variable sharded on "y" is replicated
/// over "x" (stride 2 * 2 = 4, size 2) and "z" (stride 1, size 2).
// CHECK-LABEL: module @three_axes
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"x", "y", "z"} (%[[G:.*]]: tensor<4xf32>, %[[H:.*]]: tensor<1x4xf32>) {
// CHECK:           %[[PID:.*]] = stablehlo.partition_id : tensor<ui32>
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[STRIDE_X:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK-NEXT:      %[[QX:.*]] = stablehlo.divide %[[PID]], %[[STRIDE_X]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE_X:.*]] = stablehlo.constant dense<2> : tensor<ui32>
// CHECK-NEXT:      %[[CX:.*]] = stablehlo.remainder %[[QX]], %[[SIZE_X]] : tensor<ui32>
// CHECK-NEXT:      %[[ZX:.*]] = stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[FX:.*]] = stablehlo.compare EQ, %[[CX]], %[[ZX]]
// CHECK-NEXT:      %[[STRIDE_Z:.*]] = stablehlo.constant dense<1> : tensor<ui32>
// CHECK-NEXT:      %[[QZ:.*]] = stablehlo.divide %[[PID]], %[[STRIDE_Z]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE_Z:.*]] = stablehlo.constant dense<2> : tensor<ui32>
// CHECK-NEXT:      %[[CZ:.*]] = stablehlo.remainder %[[QZ]], %[[SIZE_Z]] : tensor<ui32>
// CHECK-NEXT:      %[[ZZ:.*]] = stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[FZ:.*]] = stablehlo.compare EQ, %[[CZ]], %[[ZZ]]
// CHECK-NEXT:      %[[F:.*]] = stablehlo.and %[[FX]], %[[FZ]] : tensor<i1>
// CHECK-NEXT:      %[[NONE:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<f32>
// CHECK-NEXT:      %[[MP:.*]] = stablehlo.select %[[F]], %[[P]], %[[NONE]] : tensor<i1>, tensor<f32>
/// %h, sharded [{"x"}, {"z", "y"}], covers every axis: not masked.
// CHECK-NEXT:      %[[HH:.*]] = stablehlo.multiply %[[H]], %[[H]] : tensor<1x4xf32>
// CHECK-NEXT:      %[[Q:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<1x4xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[TOTAL:.*]] = stablehlo.add %[[MP]], %[[Q]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:      "stablehlo.all_reduce"(%[[TOTAL]])
// CHECK-SAME{LITERAL}: replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]> : tensor<1x8xi64>
// CHECK-NOT:     all_reduce
module @three_axes {
  sdy.mesh @mesh = <["x"=2, "y"=2, "z"=2]>
  func.func public @main(%g: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"y"}]>},
                         %h: tensor<2x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {"z", "y"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %gg = stablehlo.multiply %g, %g : tensor<8xf32>
    %p = stablehlo.reduce(%gg init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<2x16xf32>
    %q = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<2x16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// One axis "model"=4: a replicated variable is masked on (pid / 1) % 4, a sharded one
/// is not, and the replica group is the four devices.
// CHECK-LABEL: module @one_axis
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"model"} (%[[B:.*]]: tensor<16xf32>, %[[K:.*]]: tensor<8x4xf32>) {
// CHECK:           %[[PID:.*]] = stablehlo.partition_id : tensor<ui32>
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[STRIDE:.*]] = stablehlo.constant dense<1> : tensor<ui32>
// CHECK-NEXT:      %[[QM:.*]] = stablehlo.divide %[[PID]], %[[STRIDE]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK-NEXT:      %[[CM:.*]] = stablehlo.remainder %[[QM]], %[[SIZE]] : tensor<ui32>
// CHECK-NEXT:      %[[ZM:.*]] = stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[FM:.*]] = stablehlo.compare EQ, %[[CM]], %[[ZM]]
// CHECK-NEXT:      %[[NONE:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<f32>
// CHECK-NEXT:      %[[MP:.*]] = stablehlo.select %[[FM]], %[[P]], %[[NONE]] : tensor<i1>, tensor<f32>
// CHECK:           %[[Q:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<8x4xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[TOTAL:.*]] = stablehlo.add %[[MP]], %[[Q]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:      "stablehlo.all_reduce"(%[[TOTAL]])
// CHECK-SAME{LITERAL}: replica_groups = dense<[[0, 1, 2, 3]]> : tensor<1x4xi64>
module @one_axis {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%b: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
                         %k: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %bb = stablehlo.multiply %b, %b : tensor<16xf32>
    %p = stablehlo.reduce(%bb init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %kk = stablehlo.multiply %k, %k : tensor<8x16xf32>
    %q = stablehlo.reduce(%kk init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// An axis of size 1 holds no duplicates: a variable replicated over "batch"=1 and
/// "model"=4 is masked on "model" only (stride 1, size 4).
// CHECK-LABEL: module @size_one_axis_not_masked
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"}
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[STRIDE:.*]] = stablehlo.constant dense<1> : tensor<ui32>
// CHECK-NEXT:      stablehlo.divide %{{.*}}, %[[STRIDE]] : tensor<ui32>
// CHECK-NEXT:      %[[SIZE:.*]] = stablehlo.constant dense<4> : tensor<ui32>
// CHECK-NEXT:      stablehlo.remainder %{{.*}}, %[[SIZE]] : tensor<ui32>
// CHECK-NEXT:      stablehlo.constant dense<0> : tensor<ui32>
// CHECK-NEXT:      %[[F:.*]] = stablehlo.compare EQ
// CHECK-NOT:       stablehlo.and
// CHECK:           stablehlo.select %[[F]], %[[P]], %{{.*}} : tensor<i1>, tensor<f32>
// CHECK{LITERAL}:  replica_groups = dense<[[0, 1, 2, 3]]> : tensor<1x4xi64>
module @size_one_axis_not_masked {
  sdy.mesh @mesh = <["batch"=1, "model"=4]>
  func.func public @main(%b: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
                         %k: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %bb = stablehlo.multiply %b, %b : tensor<16xf32>
    %p = stablehlo.reduce(%bb init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %kk = stablehlo.multiply %k, %k : tensor<8x16xf32>
    %q = stablehlo.reduce(%kk init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// A one-device mesh: the local program is the global one, so the body stays in @main:
/// no sdy.manual_computation (JAX emits none when every manual axis has size 1, and XLA
/// cannot run one in a program it never partitions), no masks, no all_reduce.
// CHECK-LABEL: module @one_device
// CHECK:         func.func public @main(%[[B:.*]]: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
// CHECK-NOT:       sdy.manual_computation
// CHECK-NOT:       partition_id
// CHECK-NOT:       stablehlo.select
// CHECK-NOT:       all_reduce
// CHECK:           stablehlo.multiply %[[B]], %[[B]] : tensor<16xf32>
// CHECK:           %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial, sgdgen.norms} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      return %[[P]] : tensor<f32>
module @one_device {
  sdy.mesh @mesh = <["x"=1]>
  func.func public @main(%b: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %bb = stablehlo.multiply %b, %b : tensor<16xf32>
    %p = stablehlo.reduce(%bb init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial, sgdgen.norms} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    return %p : tensor<f32>
  }
}
