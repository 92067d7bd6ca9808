// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// All norms of a step share ONE stablehlo.all_reduce (sum) of the value sgd-fuse-step
/// tagged `sgdgen.norms`, over one replica group holding every device of the mesh
/// (global device ids, so 0..7 on a batch=2,model=4 mesh), and every user of the
/// norms value reads the all-reduced sum instead. The partials themselves are local
/// sums over the device's shard.

/// global_clipnorm: the norms value is a scalar.
// CHECK-LABEL: module @global_norm_one_all_reduce
// CHECK-NOT:     all_reduce
// CHECK:         sdy.manual_computation
// CHECK-SAME:        manual_axes={"batch", "model"} (%[[K:.*]]: tensor<8x4xf32>, %[[E:.*]]: tensor<16x2xf32>) {
// CHECK:           %[[KK:.*]] = stablehlo.multiply %[[K]], %[[K]] : tensor<8x4xf32>
// CHECK-NEXT:      %[[PK:.*]] = stablehlo.reduce(%[[KK]] init: %{{.*}}) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<8x4xf32>, tensor<f32>) -> tensor<f32>
/// ("kernel" is replicated over "batch": masked, see masking.mlir.)
// CHECK:           %[[MK:.*]] = stablehlo.select %{{.*}}, %[[PK]], %{{.*}} : tensor<i1>, tensor<f32>
// CHECK-NEXT:      %[[EE:.*]] = stablehlo.multiply %[[E]], %[[E]] : tensor<16x2xf32>
// CHECK-NEXT:      %[[PE:.*]] = stablehlo.reduce(%[[EE]] init: %{{.*}}) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<16x2xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[TOTAL:.*]] = stablehlo.add %[[MK]], %[[PE]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:      %[[SUM:.*]] = "stablehlo.all_reduce"(%[[TOTAL]]) <{channel_handle = #stablehlo.channel_handle<handle = 1, type = 1>,
// CHECK-SAME{LITERAL}: replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]> : tensor<1x8xi64>,
// CHECK-SAME:        use_global_device_ids}> ({
// CHECK-NEXT:      ^bb0(%[[X:.*]]: tensor<f32>, %[[Y:.*]]: tensor<f32>):
// CHECK-NEXT:        %[[XY:.*]] = stablehlo.add %[[X]], %[[Y]] : tensor<f32>
// CHECK-NEXT:        stablehlo.return %[[XY]] : tensor<f32>
// CHECK-NEXT:      }) : (tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[NORM:.*]] = stablehlo.sqrt %[[SUM]] : tensor<f32>
// CHECK-NEXT:      sdy.return %[[NORM]] : tensor<f32>
// CHECK-NOT:     all_reduce
module @global_norm_one_all_reduce {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%k: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %e: tensor<32x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %kk = stablehlo.multiply %k, %k : tensor<8x16xf32>
    %pk = stablehlo.reduce(%kk init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    %ee = stablehlo.multiply %e, %e : tensor<32x8xf32>
    %pe = stablehlo.reduce(%ee init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<32x8xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %pk, %pe {sgdgen.norms} : tensor<f32>
    %norm = stablehlo.sqrt %total : tensor<f32>
    return %norm : tensor<f32>
  }
}

// -----

/// clipnorm: the norms value is the packed vector of per-variable partials; the one
/// all_reduce sums it elementwise (tensor<2xf64>), and each clip's slice reads the
/// reduced vector. Masking happens before packing, on the scalar partial.
// CHECK-LABEL: module @clipnorm_vector_one_all_reduce
// CHECK-NOT:     all_reduce
// CHECK:           %[[P0:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<8x4xf64>, tensor<f64>) -> tensor<f64>
// CHECK:           %[[M0:.*]] = stablehlo.select %{{.*}}, %[[P0]], %{{.*}} : tensor<i1>, tensor<f64>
// CHECK:           %[[P1:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial} : (tensor<16x2xf64>, tensor<f64>) -> tensor<f64>
// CHECK-NEXT:      %[[V0:.*]] = stablehlo.reshape %[[M0]] : (tensor<f64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[V1:.*]] = stablehlo.reshape %[[P1]] : (tensor<f64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[PACKED:.*]] = stablehlo.concatenate %[[V0]], %[[V1]], dim = 0 {sgdgen.norms} : (tensor<1xf64>, tensor<1xf64>) -> tensor<2xf64>
// CHECK-NEXT:      %[[SUMS:.*]] = "stablehlo.all_reduce"(%[[PACKED]])
// CHECK-SAME{LITERAL}: replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]> : tensor<1x8xi64>
// CHECK-NEXT:      ^bb0(%{{.*}}: tensor<f64>, %{{.*}}: tensor<f64>):
// CHECK:           }) : (tensor<2xf64>) -> tensor<2xf64>
// CHECK-NEXT:      %[[E0:.*]] = stablehlo.slice %[[SUMS]] [0:1] : (tensor<2xf64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[N0:.*]] = stablehlo.reshape %[[E0]] : (tensor<1xf64>) -> tensor<f64>
// CHECK-NEXT:      %[[E1:.*]] = stablehlo.slice %[[SUMS]] [1:2] : (tensor<2xf64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[N1:.*]] = stablehlo.reshape %[[E1]] : (tensor<1xf64>) -> tensor<f64>
// CHECK-NEXT:      sdy.return %[[N0]], %[[N1]] : tensor<f64>, tensor<f64>
// CHECK-NOT:     all_reduce
module @clipnorm_vector_one_all_reduce {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%k: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %e: tensor<32x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>})
      -> (tensor<f64> {sdy.sharding = #sdy.sharding<@mesh, []>}, tensor<f64> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f64>
    %kk = stablehlo.multiply %k, %k : tensor<8x16xf32>
    %kw = stablehlo.convert %kk : (tensor<8x16xf32>) -> tensor<8x16xf64>
    %pk = stablehlo.reduce(%kw init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<8x16xf64>, tensor<f64>) -> tensor<f64>
    %ee = stablehlo.multiply %e, %e : tensor<32x8xf32>
    %ew = stablehlo.convert %ee : (tensor<32x8xf32>) -> tensor<32x8xf64>
    %pe = stablehlo.reduce(%ew init: %zero) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<32x8xf64>, tensor<f64>) -> tensor<f64>
    %vk = stablehlo.reshape %pk : (tensor<f64>) -> tensor<1xf64>
    %ve = stablehlo.reshape %pe : (tensor<f64>) -> tensor<1xf64>
    %packed = stablehlo.concatenate %vk, %ve, dim = 0 {sgdgen.norms} : (tensor<1xf64>, tensor<1xf64>) -> tensor<2xf64>
    %s0 = stablehlo.slice %packed [0:1] : (tensor<2xf64>) -> tensor<1xf64>
    %n0 = stablehlo.reshape %s0 : (tensor<1xf64>) -> tensor<f64>
    %s1 = stablehlo.slice %packed [1:2] : (tensor<2xf64>) -> tensor<1xf64>
    %n1 = stablehlo.reshape %s1 : (tensor<1xf64>) -> tensor<f64>
    return %n0, %n1 : tensor<f64>, tensor<f64>
  }
}

// -----

/// A step without norms (no sgdgen.norm_partial) needs no collective at all.
// CHECK-LABEL: module @no_norms_no_collective
// CHECK-NOT:     partition_id
// CHECK-NOT:     all_reduce
// CHECK:         sdy.return
module @no_norms_no_collective {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%w: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>}) {
    %n = stablehlo.negate %w : tensor<8x16xf32>
    return %n : tensor<8x16xf32>
  }
}
