// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-fuse-step)' | filecheck %s

/// clipnorm: each variable is clipped by its own norm, so the partials are not summed.
/// They are packed into one vector, reshape to tensor<1x..> + concatenate, tagged
/// `sgdgen.norms` (the one value sgd-insert-collectives all-reduces), and every clip
/// reads its own element back with slice + reshape instead of the partial itself.

// CHECK-LABEL: module @packs_three_partials
// CHECK:         func.func public @main(%[[A:.*]]: tensor<4xf32>, %[[B:.*]]: tensor<8xf32>, %[[C:.*]]: tensor<2x2xf32>)
// CHECK:           %[[P0:.*]] = stablehlo.reduce{{.*}} {sgdgen.norm_partial} : (tensor<4xf64>, tensor<f64>) -> tensor<f64>
// CHECK:           %[[P1:.*]] = stablehlo.reduce{{.*}} {sgdgen.norm_partial} : (tensor<8xf64>, tensor<f64>) -> tensor<f64>
// CHECK:           %[[P2:.*]] = stablehlo.reduce{{.*}} {sgdgen.norm_partial} : (tensor<2x2xf64>, tensor<f64>) -> tensor<f64>
// CHECK-NEXT:      %[[V0:.*]] = stablehlo.reshape %[[P0]] : (tensor<f64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[V1:.*]] = stablehlo.reshape %[[P1]] : (tensor<f64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[V2:.*]] = stablehlo.reshape %[[P2]] : (tensor<f64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[PACKED:.*]] = stablehlo.concatenate %[[V0]], %[[V1]], %[[V2]], dim = 0 {sgdgen.norms} : (tensor<1xf64>, tensor<1xf64>, tensor<1xf64>) -> tensor<3xf64>
// CHECK-NEXT:      %[[E0:.*]] = stablehlo.slice %[[PACKED]] [0:1] : (tensor<3xf64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[N0:.*]] = stablehlo.reshape %[[E0]] : (tensor<1xf64>) -> tensor<f64>
// CHECK-NEXT:      %[[E1:.*]] = stablehlo.slice %[[PACKED]] [1:2] : (tensor<3xf64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[N1:.*]] = stablehlo.reshape %[[E1]] : (tensor<1xf64>) -> tensor<f64>
// CHECK-NEXT:      %[[E2:.*]] = stablehlo.slice %[[PACKED]] [2:3] : (tensor<3xf64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[N2:.*]] = stablehlo.reshape %[[E2]] : (tensor<1xf64>) -> tensor<f64>
// CHECK:           stablehlo.convert %[[N0]] : (tensor<f64>) -> tensor<f32>
// CHECK:           stablehlo.convert %[[N1]] : (tensor<f64>) -> tensor<f32>
// CHECK:           stablehlo.convert %[[N2]] : (tensor<f64>) -> tensor<f32>
// CHECK:           return
module @packs_three_partials {
  func.func private @norm_sq_4xf32(%g: tensor<4xf32>) -> tensor<f64> attributes {sgdgen.stage = "norm_partial"} {
    %terms = stablehlo.multiply %g, %g : tensor<4xf32>
    %wide = stablehlo.convert %terms : (tensor<4xf32>) -> tensor<4xf64>
    %zero = stablehlo.constant dense<0.0> : tensor<f64>
    %sum = stablehlo.reduce(%wide init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf64>, tensor<f64>) -> tensor<f64>
    return %sum : tensor<f64>
  }
  func.func private @norm_sq_8xf32(%g: tensor<8xf32>) -> tensor<f64> attributes {sgdgen.stage = "norm_partial"} {
    %terms = stablehlo.multiply %g, %g : tensor<8xf32>
    %wide = stablehlo.convert %terms : (tensor<8xf32>) -> tensor<8xf64>
    %zero = stablehlo.constant dense<0.0> : tensor<f64>
    %sum = stablehlo.reduce(%wide init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<8xf64>, tensor<f64>) -> tensor<f64>
    return %sum : tensor<f64>
  }
  func.func private @norm_sq_2x2xf32(%g: tensor<2x2xf32>) -> tensor<f64> attributes {sgdgen.stage = "norm_partial"} {
    %terms = stablehlo.multiply %g, %g : tensor<2x2xf32>
    %wide = stablehlo.convert %terms : (tensor<2x2xf32>) -> tensor<2x2xf64>
    %zero = stablehlo.constant dense<0.0> : tensor<f64>
    %sum = stablehlo.reduce(%wide init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<2x2xf64>, tensor<f64>) -> tensor<f64>
    return %sum : tensor<f64>
  }
  func.func private @clip_norm_4xf32(%g: tensor<4xf32>, %l2sum_wide: tensor<f64>) -> tensor<4xf32> attributes {sgdgen.stage = "clip_norm"} {
    %l2sum = stablehlo.convert %l2sum_wide : (tensor<f64>) -> tensor<f32>
    %norm = stablehlo.sqrt %l2sum : tensor<f32>
    %norm_b = stablehlo.broadcast_in_dim %norm, dims = [] : (tensor<f32>) -> tensor<4xf32>
    %clipped = stablehlo.divide %g, %norm_b : tensor<4xf32>
    return %clipped : tensor<4xf32>
  }
  func.func private @clip_norm_8xf32(%g: tensor<8xf32>, %l2sum_wide: tensor<f64>) -> tensor<8xf32> attributes {sgdgen.stage = "clip_norm"} {
    %l2sum = stablehlo.convert %l2sum_wide : (tensor<f64>) -> tensor<f32>
    %norm = stablehlo.sqrt %l2sum : tensor<f32>
    %norm_b = stablehlo.broadcast_in_dim %norm, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %clipped = stablehlo.divide %g, %norm_b : tensor<8xf32>
    return %clipped : tensor<8xf32>
  }
  func.func private @clip_norm_2x2xf32(%g: tensor<2x2xf32>, %l2sum_wide: tensor<f64>) -> tensor<2x2xf32> attributes {sgdgen.stage = "clip_norm"} {
    %l2sum = stablehlo.convert %l2sum_wide : (tensor<f64>) -> tensor<f32>
    %norm = stablehlo.sqrt %l2sum : tensor<f32>
    %norm_b = stablehlo.broadcast_in_dim %norm, dims = [] : (tensor<f32>) -> tensor<2x2xf32>
    %clipped = stablehlo.divide %g, %norm_b : tensor<2x2xf32>
    return %clipped : tensor<2x2xf32>
  }
  func.func public @main(%a: tensor<4xf32>, %b: tensor<8xf32>, %c: tensor<2x2xf32>) -> (tensor<4xf32>, tensor<8xf32>, tensor<2x2xf32>) {
    %p0 = func.call @norm_sq_4xf32(%a) : (tensor<4xf32>) -> tensor<f64>
    %p1 = func.call @norm_sq_8xf32(%b) : (tensor<8xf32>) -> tensor<f64>
    %p2 = func.call @norm_sq_2x2xf32(%c) : (tensor<2x2xf32>) -> tensor<f64>
    %ca = func.call @clip_norm_4xf32(%a, %p0) : (tensor<4xf32>, tensor<f64>) -> tensor<4xf32>
    %cb = func.call @clip_norm_8xf32(%b, %p1) : (tensor<8xf32>, tensor<f64>) -> tensor<8xf32>
    %cc = func.call @clip_norm_2x2xf32(%c, %p2) : (tensor<2x2xf32>, tensor<f64>) -> tensor<2x2xf32>
    return %ca, %cb, %cc : tensor<4xf32>, tensor<8xf32>, tensor<2x2xf32>
  }
}

// -----

/// Two partials of one function (two variables of one class) pack into a tensor<2xf64>;
/// each clip reads the element of its own variable.

// CHECK-LABEL: module @packs_two_partials_of_one_class
// CHECK:         func.func public @main(%[[A:.*]]: tensor<4xf32>, %[[B:.*]]: tensor<4xf32>)
// CHECK:           %[[P0:.*]] = stablehlo.reduce{{.*}} {sgdgen.norm_partial}
// CHECK:           %[[P1:.*]] = stablehlo.reduce{{.*}} {sgdgen.norm_partial}
// CHECK-NEXT:      %[[V0:.*]] = stablehlo.reshape %[[P0]] : (tensor<f64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[V1:.*]] = stablehlo.reshape %[[P1]] : (tensor<f64>) -> tensor<1xf64>
// CHECK-NEXT:      %[[PACKED:.*]] = stablehlo.concatenate %[[V0]], %[[V1]], dim = 0 {sgdgen.norms} : (tensor<1xf64>, tensor<1xf64>) -> tensor<2xf64>
// CHECK-NEXT:      %[[E0:.*]] = stablehlo.slice %[[PACKED]] [0:1]
// CHECK-NEXT:      %[[N0:.*]] = stablehlo.reshape %[[E0]] : (tensor<1xf64>) -> tensor<f64>
// CHECK-NEXT:      %[[E1:.*]] = stablehlo.slice %[[PACKED]] [1:2]
// CHECK-NEXT:      %[[N1:.*]] = stablehlo.reshape %[[E1]] : (tensor<1xf64>) -> tensor<f64>
// CHECK-NEXT:      %[[S0:.*]] = stablehlo.convert %[[N0]] : (tensor<f64>) -> tensor<f32>
// CHECK:           stablehlo.divide %[[A]], %{{.*}} : tensor<4xf32>
// CHECK-NEXT:      %[[S1:.*]] = stablehlo.convert %[[N1]] : (tensor<f64>) -> tensor<f32>
// CHECK:           stablehlo.divide %[[B]], %{{.*}} : tensor<4xf32>
module @packs_two_partials_of_one_class {
  func.func private @norm_sq_4xf32(%g: tensor<4xf32>) -> tensor<f64> attributes {sgdgen.stage = "norm_partial"} {
    %terms = stablehlo.multiply %g, %g : tensor<4xf32>
    %wide = stablehlo.convert %terms : (tensor<4xf32>) -> tensor<4xf64>
    %zero = stablehlo.constant dense<0.0> : tensor<f64>
    %sum = stablehlo.reduce(%wide init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf64>, tensor<f64>) -> tensor<f64>
    return %sum : tensor<f64>
  }
  func.func private @clip_norm_4xf32(%g: tensor<4xf32>, %l2sum_wide: tensor<f64>) -> tensor<4xf32> attributes {sgdgen.stage = "clip_norm"} {
    %l2sum = stablehlo.convert %l2sum_wide : (tensor<f64>) -> tensor<f32>
    %norm = stablehlo.sqrt %l2sum : tensor<f32>
    %norm_b = stablehlo.broadcast_in_dim %norm, dims = [] : (tensor<f32>) -> tensor<4xf32>
    %clipped = stablehlo.divide %g, %norm_b : tensor<4xf32>
    return %clipped : tensor<4xf32>
  }
  func.func public @main(%a: tensor<4xf32>, %b: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %p0 = func.call @norm_sq_4xf32(%a) : (tensor<4xf32>) -> tensor<f64>
    %p1 = func.call @norm_sq_4xf32(%b) : (tensor<4xf32>) -> tensor<f64>
    %ca = func.call @clip_norm_4xf32(%a, %p0) : (tensor<4xf32>, tensor<f64>) -> tensor<4xf32>
    %cb = func.call @clip_norm_4xf32(%b, %p1) : (tensor<4xf32>, tensor<f64>) -> tensor<4xf32>
    return %ca, %cb : tensor<4xf32>, tensor<4xf32>
  }
}

// -----

/// clipnorm with a single variable: nothing to pack; the partial itself is tagged
/// `sgdgen.norms` and its clip reads it directly.

// CHECK-LABEL: module @single_clipnorm_partial
// CHECK:         %[[P:.*]] = stablehlo.reduce{{.*}} {sgdgen.norm_partial, sgdgen.norms} : (tensor<4xf64>, tensor<f64>) -> tensor<f64>
// CHECK-NOT:     stablehlo.concatenate
// CHECK-NOT:     stablehlo.slice
// CHECK:         stablehlo.convert %[[P]] : (tensor<f64>) -> tensor<f32>
module @single_clipnorm_partial {
  func.func private @norm_sq_4xf32(%g: tensor<4xf32>) -> tensor<f64> attributes {sgdgen.stage = "norm_partial"} {
    %terms = stablehlo.multiply %g, %g : tensor<4xf32>
    %wide = stablehlo.convert %terms : (tensor<4xf32>) -> tensor<4xf64>
    %zero = stablehlo.constant dense<0.0> : tensor<f64>
    %sum = stablehlo.reduce(%wide init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<4xf64>, tensor<f64>) -> tensor<f64>
    return %sum : tensor<f64>
  }
  func.func private @clip_norm_4xf32(%g: tensor<4xf32>, %l2sum_wide: tensor<f64>) -> tensor<4xf32> attributes {sgdgen.stage = "clip_norm"} {
    %l2sum = stablehlo.convert %l2sum_wide : (tensor<f64>) -> tensor<f32>
    %norm = stablehlo.sqrt %l2sum : tensor<f32>
    %norm_b = stablehlo.broadcast_in_dim %norm, dims = [] : (tensor<f32>) -> tensor<4xf32>
    %clipped = stablehlo.divide %g, %norm_b : tensor<4xf32>
    return %clipped : tensor<4xf32>
  }
  func.func public @main(%a: tensor<4xf32>) -> tensor<4xf32> {
    %p = func.call @norm_sq_4xf32(%a) : (tensor<4xf32>) -> tensor<f64>
    %ca = func.call @clip_norm_4xf32(%a, %p) : (tensor<4xf32>, tensor<f64>) -> tensor<4xf32>
    return %ca : tensor<4xf32>
  }
}
