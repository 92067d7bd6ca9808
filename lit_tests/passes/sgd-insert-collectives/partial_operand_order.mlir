// RUN: sgdgen-opt %s --pass-pipeline='builtin.module(sgd-insert-collectives)' | filecheck %s

/// BUG (sgd-insert-collectives): the tensor a norm partial sums over is found by
/// following FIRST operands up from the partial (`_source_tensor`). When the tagged
/// partial is `multiply %half, %sum` (the constant first, which is the same l2_loss as
/// `multiply %sum, %half`), the walk stops at the scalar constant, whose layout is
/// "replicated over every axis", so the partial of a variable sharded over EVERY axis
/// is masked. Observed: `stablehlo.select %first, %p, %zero` on the partial of %g
/// ([{"a", "b"}]), i.e. the global norm drops the shards of 7 of the 8 devices.
/// Expected: no mask; the source is the sharded tensor that was reduced, whichever
/// operand of the scalar op it arrives through. Remove the XFAIL line once fixed.

/// %g is sharded over every axis: its partial must reach the all_reduce unmasked.
// CHECK-LABEL: module @constant_first_operand
// CHECK:         %[[P:.*]] = stablehlo.multiply %{{.*}}, %{{.*}} {sgdgen.norm_partial} : tensor<f32>
// CHECK-NOT:     stablehlo.select
// CHECK:         %[[Q:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK-NEXT:    %[[TOTAL:.*]] = stablehlo.add %[[P]], %[[Q]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:    "stablehlo.all_reduce"(%[[TOTAL]])
module @constant_first_operand {
  sdy.mesh @mesh = <["a"=2, "b"=4]>
  func.func public @main(%g: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"a", "b"}]>},
                         %h: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"b", "a"}]>})
      -> (tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>}) {
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %half = stablehlo.constant dense<0.5> : tensor<f32>
    %sq = stablehlo.multiply %g, %g : tensor<16xf32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %p = stablehlo.multiply %half, %sum {sgdgen.norm_partial} : tensor<f32>
    %hh = stablehlo.multiply %h, %h : tensor<16xf32>
    %q = stablehlo.reduce(%hh init: %zero) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    %total = stablehlo.add %p, %q {sgdgen.norms} : tensor<f32>
    return %total : tensor<f32>
  }
}
