// RUN: sgdgen-opt %s --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// BUG (sgd-insert-collectives): when the only norm partial is itself the joined value
/// (tagged `sgdgen.norm_partial, sgdgen.norms`: global_clipnorm or clipnorm with ONE
/// variable) and that variable is replicated over some axis, the mask is applied
/// AFTER the all_reduce instead of before it. The pass inserts the select after the
/// partial, then inserts the all_reduce right after the same op and redirects every
/// use of the partial, including the select's, to the all_reduce. Observed:
///   %p   = stablehlo.reduce ... {sgdgen.norm_partial, sgdgen.norms}
///   %sum = "stablehlo.all_reduce"(%p) ...              // sums 8 unmasked copies
///   ...
///   %m   = stablehlo.select %first, %sum, %zero        // 0 on 7 of the 8 devices
/// so device 0 sees 8x the squared norm and every other device sees 0. Expected: the
/// select masks the partial and the all_reduce sums the masked value. The same happens
/// end to end with `sgdgen emit --lowered` for global_clipnorm and one replicated
/// variable on a batch=2,model=4 mesh. Remove the XFAIL line once fixed.

/// A single partial of a fully replicated variable: mask first, then the one all_reduce.
// CHECK-LABEL: module @single_replicated_partial
// CHECK:         %[[PID:.*]] = stablehlo.partition_id : tensor<ui32>
// CHECK:         %[[P:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial, sgdgen.norms} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NOT:     all_reduce
// CHECK:         %[[MASKED:.*]] = stablehlo.select %{{.*}}, %[[P]], %{{.*}} : tensor<i1>, tensor<f32>
// CHECK:         %[[SUM:.*]] = "stablehlo.all_reduce"(%[[MASKED]])
// CHECK-SAME{LITERAL}: replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]> : tensor<1x8xi64>
// CHECK:         }) : (tensor<f32>) -> tensor<f32>
// CHECK-NEXT:    %[[NORM:.*]] = stablehlo.sqrt %[[SUM]] : tensor<f32>
// CHECK-NEXT:    sdy.return %[[NORM]] : tensor<f32>
// CHECK-NOT:     all_reduce
module @single_replicated_partial {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%g: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %p = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial, sgdgen.norms} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %norm = stablehlo.sqrt %p : tensor<f32>
    return %norm : tensor<f32>
  }
}
