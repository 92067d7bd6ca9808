// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-fuse-step)' | filecheck %s

/// global_clipnorm: the op that produces each inlined norm_partial result is tagged
/// `sgdgen.norm_partial`, and the chain of adds that sums the partials is rebuilt as a
/// balanced tree whose root, the one value sgd-insert-collectives all-reduces, is tagged
/// `sgdgen.norms`. The old chain is erased.

// CHECK-LABEL: module @three_partials
// CHECK:         func.func public @main(%[[A:.*]]: tensor<4xf32>, %[[B:.*]]: tensor<8xf32>, %[[C:.*]]: tensor<2x2xf32>)
/// (The ops before the partial are not tagged.)
// CHECK:           %[[SQ_A:.*]] = stablehlo.multiply %[[A]], %[[A]] : tensor<4xf32>{{$}}
// CHECK:           %[[P0:.*]] = stablehlo.reduce(%[[SQ_A]] init: %{{.*}}) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
// CHECK:           %[[P1:.*]] = stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0] {sgdgen.norm_partial} : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
// CHECK:           %[[P2:.*]] = stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0, 1] {sgdgen.norm_partial} : (tensor<2x2xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:      %[[S01:.*]] = stablehlo.add %[[P0]], %[[P1]] : tensor<f32>
// CHECK-NEXT:      %[[TOTAL:.*]] = stablehlo.add %[[S01]], %[[P2]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:      %[[NORM:.*]] = stablehlo.sqrt %[[TOTAL]] : tensor<f32>
// CHECK-NEXT:      return %[[NORM]] : tensor<f32>
module @three_partials {
  func.func private @sq_sum_4xf32(%g: tensor<4xf32>) -> tensor<f32> attributes {sgdgen.stage = "norm_partial"} {
    %sq = stablehlo.multiply %g, %g : tensor<4xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
    return %sum : tensor<f32>
  }
  func.func private @sq_sum_8xf32(%g: tensor<8xf32>) -> tensor<f32> attributes {sgdgen.stage = "norm_partial"} {
    %sq = stablehlo.multiply %g, %g : tensor<8xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
    return %sum : tensor<f32>
  }
  func.func private @sq_sum_2x2xf32(%g: tensor<2x2xf32>) -> tensor<f32> attributes {sgdgen.stage = "norm_partial"} {
    %sq = stablehlo.multiply %g, %g : tensor<2x2xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<2x2xf32>, tensor<f32>) -> tensor<f32>
    return %sum : tensor<f32>
  }
  func.func public @main(%a: tensor<4xf32>, %b: tensor<8xf32>, %c: tensor<2x2xf32>) -> tensor<f32> {
    %p0 = func.call @sq_sum_4xf32(%a) : (tensor<4xf32>) -> tensor<f32>
    %p1 = func.call @sq_sum_8xf32(%b) : (tensor<8xf32>) -> tensor<f32>
    %p2 = func.call @sq_sum_2x2xf32(%c) : (tensor<2x2xf32>) -> tensor<f32>
    %s01 = stablehlo.add %p0, %p1 : tensor<f32>
    %total = stablehlo.add %s01, %p2 : tensor<f32>
    %norm = stablehlo.sqrt %total : tensor<f32>
    return %norm : tensor<f32>
  }
}

// -----

/// Four partials summed left to right, ((p0 + p1) + p2) + p3 (depth 3), become
/// (p0 + p1) + (p2 + p3) (depth 2); only the root is tagged.

// CHECK-LABEL: module @four_partials_balanced
// CHECK:         %[[P0:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[P1:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[P2:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[P3:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK-NEXT:    %[[S01:.*]] = stablehlo.add %[[P0]], %[[P1]] : tensor<f32>
// CHECK-NEXT:    %[[S23:.*]] = stablehlo.add %[[P2]], %[[P3]] : tensor<f32>
// CHECK-NEXT:    %[[TOTAL:.*]] = stablehlo.add %[[S01]], %[[S23]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:    %[[NORM:.*]] = stablehlo.sqrt %[[TOTAL]] : tensor<f32>
// CHECK-NEXT:    return %[[NORM]]
module @four_partials_balanced {
  func.func private @sq_sum_4xf32(%g: tensor<4xf32>) -> tensor<f32> attributes {sgdgen.stage = "norm_partial"} {
    %sq = stablehlo.multiply %g, %g : tensor<4xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
    return %sum : tensor<f32>
  }
  func.func public @main(%a: tensor<4xf32>, %b: tensor<4xf32>, %c: tensor<4xf32>, %d: tensor<4xf32>) -> tensor<f32> {
    %p0 = func.call @sq_sum_4xf32(%a) : (tensor<4xf32>) -> tensor<f32>
    %p1 = func.call @sq_sum_4xf32(%b) : (tensor<4xf32>) -> tensor<f32>
    %p2 = func.call @sq_sum_4xf32(%c) : (tensor<4xf32>) -> tensor<f32>
    %p3 = func.call @sq_sum_4xf32(%d) : (tensor<4xf32>) -> tensor<f32>
    %s01 = stablehlo.add %p0, %p1 : tensor<f32>
    %s012 = stablehlo.add %s01, %p2 : tensor<f32>
    %total = stablehlo.add %s012, %p3 : tensor<f32>
    %norm = stablehlo.sqrt %total : tensor<f32>
    return %norm : tensor<f32>
  }
}

// -----

/// Five partials: pairs first, the odd one joins at the top, ((p0 + p1) + (p2 + p3)) + p4.

// CHECK-LABEL: module @five_partials_balanced
// CHECK:         %[[P0:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[P1:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[P2:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[P3:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK:         %[[P4:.*]] = stablehlo.reduce{{.*}}{sgdgen.norm_partial}
// CHECK-NEXT:    %[[S01:.*]] = stablehlo.add %[[P0]], %[[P1]] : tensor<f32>
// CHECK-NEXT:    %[[S23:.*]] = stablehlo.add %[[P2]], %[[P3]] : tensor<f32>
// CHECK-NEXT:    %[[S0123:.*]] = stablehlo.add %[[S01]], %[[S23]] : tensor<f32>
// CHECK-NEXT:    %[[TOTAL:.*]] = stablehlo.add %[[S0123]], %[[P4]] {sgdgen.norms} : tensor<f32>
// CHECK-NEXT:    return %[[TOTAL]]
module @five_partials_balanced {
  func.func private @sq_sum_4xf32(%g: tensor<4xf32>) -> tensor<f32> attributes {sgdgen.stage = "norm_partial"} {
    %sq = stablehlo.multiply %g, %g : tensor<4xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
    return %sum : tensor<f32>
  }
  func.func public @main(%a: tensor<4xf32>, %b: tensor<4xf32>, %c: tensor<4xf32>, %d: tensor<4xf32>, %e: tensor<4xf32>) -> tensor<f32> {
    %p0 = func.call @sq_sum_4xf32(%a) : (tensor<4xf32>) -> tensor<f32>
    %p1 = func.call @sq_sum_4xf32(%b) : (tensor<4xf32>) -> tensor<f32>
    %p2 = func.call @sq_sum_4xf32(%c) : (tensor<4xf32>) -> tensor<f32>
    %p3 = func.call @sq_sum_4xf32(%d) : (tensor<4xf32>) -> tensor<f32>
    %p4 = func.call @sq_sum_4xf32(%e) : (tensor<4xf32>) -> tensor<f32>
    %s01 = stablehlo.add %p0, %p1 : tensor<f32>
    %s012 = stablehlo.add %s01, %p2 : tensor<f32>
    %s0123 = stablehlo.add %s012, %p3 : tensor<f32>
    %total = stablehlo.add %s0123, %p4 : tensor<f32>
    return %total : tensor<f32>
  }
}

// -----

/// The partial is whatever op returns the norm_partial function's result, here the
/// final halving multiply of an l2_loss (the reduce before it is not tagged).

// CHECK-LABEL: module @tags_the_returned_op
// CHECK:         %[[SUM:.*]] = stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<4xf64>, tensor<f64>) -> tensor<f64>
// CHECK:         %[[P0:.*]] = stablehlo.multiply %[[SUM]], %{{.*}} {sgdgen.norm_partial} : tensor<f64>
// CHECK:         %[[P1:.*]] = stablehlo.multiply %{{.*}}, %{{.*}} {sgdgen.norm_partial} : tensor<f64>
// CHECK-NEXT:    %[[TOTAL:.*]] = stablehlo.add %[[P0]], %[[P1]] {sgdgen.norms} : tensor<f64>
// CHECK-NEXT:    return %[[TOTAL]]
module @tags_the_returned_op {
  func.func private @l2_loss_4xf32(%g: tensor<4xf32>) -> tensor<f64> attributes {sgdgen.stage = "norm_partial"} {
    %terms = stablehlo.multiply %g, %g : tensor<4xf32>
    %wide = stablehlo.convert %terms : (tensor<4xf32>) -> tensor<4xf64>
    %zero = stablehlo.constant dense<0.0> : tensor<f64>
    %sum = stablehlo.reduce(%wide init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf64>, tensor<f64>) -> tensor<f64>
    %half = stablehlo.constant dense<0.5> : tensor<f64>
    %partial = stablehlo.multiply %sum, %half : tensor<f64>
    return %partial : tensor<f64>
  }
  func.func public @main(%a: tensor<4xf32>, %b: tensor<4xf32>) -> tensor<f64> {
    %p0 = func.call @l2_loss_4xf32(%a) : (tensor<4xf32>) -> tensor<f64>
    %p1 = func.call @l2_loss_4xf32(%b) : (tensor<4xf32>) -> tensor<f64>
    %total = stablehlo.add %p0, %p1 : tensor<f64>
    return %total : tensor<f64>
  }
}

// -----

/// A single partial (one variable under global_clipnorm) is itself the joined value:
/// tagged both `sgdgen.norm_partial` and `sgdgen.norms`, no add is made.

// CHECK-LABEL: module @single_partial_is_the_norms
// CHECK:         %[[P:.*]] = stablehlo.reduce{{.*}} {sgdgen.norm_partial, sgdgen.norms} : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
// CHECK-NEXT:    %[[NORM:.*]] = stablehlo.sqrt %[[P]] : tensor<f32>
// CHECK-NEXT:    return %[[NORM]]
module @single_partial_is_the_norms {
  func.func private @sq_sum_4xf32(%g: tensor<4xf32>) -> tensor<f32> attributes {sgdgen.stage = "norm_partial"} {
    %sq = stablehlo.multiply %g, %g : tensor<4xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%sq init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf32>, tensor<f32>) -> tensor<f32>
    return %sum : tensor<f32>
  }
  func.func public @main(%a: tensor<4xf32>) -> tensor<f32> {
    %p = func.call @sq_sum_4xf32(%a) : (tensor<4xf32>) -> tensor<f32>
    %norm = stablehlo.sqrt %p : tensor<f32>
    return %norm : tensor<f32>
  }
}
